"""What the interpreter needs from a backend, and the errors backends raise."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

from radixlm.lang.chat_template import CHATML, ChatTemplate
from radixlm.lang.choices import ChoicesDecision


class BackendError(RuntimeError):
    """The backend rejected or failed a request (HTTP status other than 200, abort, bad input)."""


class BackendConnectionError(ConnectionError):
    """The server cannot be reached (not started, gone away, wrong URL)."""


class BaseBackend:
    """Interface of a frontend backend. `s` is the interpreter's StreamExecutor: backends read
    `s.text_` (the prompt so far) and, for chat APIs, `s.messages_` / `s.cur_role`."""

    is_chat_model = False

    def get_chat_template(self) -> ChatTemplate:
        return CHATML

    def cache_prefix(self, prefix_str: str) -> None:
        """Hints that `prefix_str` starts upcoming prompts (a prefill-only request on radixlm)."""

    def commit_lazy_operations(self, s) -> None:
        """Called by fork(n > 1): the shared prefix is sent once before the branches diverge."""

    def generate(self, s, sampling: Any) -> Tuple[str, Dict[str, Any]]:
        raise NotImplementedError

    def generate_stream(self, s, sampling: Any) -> Iterator[Tuple[str, Dict[str, Any]]]:
        """Yields (text delta, meta info so far); the last meta info is the final one."""
        text, meta = self.generate(s, sampling)
        yield text, meta

    def select(self, s, choices: List[str], temperature: float, choices_method: Any) -> ChoicesDecision:
        raise NotImplementedError

    def flush_cache(self) -> Any:
        return None

    def get_server_info(self) -> Dict[str, Any]:
        return {}

    def shutdown(self) -> None:
        pass
