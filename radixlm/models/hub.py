"""Model paths that are not local directories: Hugging Face hub ids (`Qwen/Qwen3-8B`), resolved to a
snapshot directory in the hub cache through `huggingface_hub.snapshot_download` (config, tokenizer and
safetensors files only; `--revision`; `HF_HOME` / `HF_HUB_CACHE` / `HF_HUB_OFFLINE` read when the call
is made, not when huggingface_hub was imported). Also the `--chat-template` lookup (a file, or the name
of a template shipped here).

`prepare_args` is called once per Engine / server before any process starts: every later reader of
`model_path` (scheduler, detokenizer, tensor-parallel ranks, data-parallel replicas) then sees a local
directory, and `hub_model_id` keeps the id the user gave (reported by /get_model_info). Every failure
is a ValueError with one line naming the field (model_path, tokenizer_path, chat_template).
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

# what a checkpoint needs: config.json, generation_config.json, tokenizer files, safetensors (+ index)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BUILTIN_CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE}


def _truthy(v: Optional[str]) -> bool:
    return (v or "").strip().lower() in ("1", "on", "yes", "true")


def hub_cache_dir() -> str:
    """HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (as huggingface_hub computes it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def is_hub_id(path: str) -> bool:
    return (not os.path.exists(path) and not path.startswith((".", "/", "~")) and bool(_REPO_ID.match(path))
            and ".." not in path)


def resolve_model_path(path: str, revision: Optional[str] = None, field: str = "model_path") -> str:
    """A local directory for `path`: itself when it is one, else the hub snapshot of the id `path`.
    Raises a one-line ValueError naming `field` when neither works."""
    if os.path.isdir(path):
        return path
    if not is_hub_id(path):
        raise ValueError(f"{field}: {path!r} is not a directory (nor a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:  # pragma: no cover - transformers depends on it
        raise ValueError(f"{field}: {path!r} is not a local directory and huggingface_hub is not installed") from None
    offline = _truthy(os.environ.get("HF_HUB_OFFLINE"))
    rev = f" (revision {revision})" if revision else ""
    try:
        local = snapshot_download(path, revision=revision, allow_patterns=ALLOW_PATTERNS, cache_dir=hub_cache_dir(),
                                  local_files_only=offline)
    except RevisionNotFoundError:
        raise ValueError(f"{field}: the hub repository {path!r} has no revision {revision!r}") from None
    except GatedRepoError:
        raise ValueError(f"{field}: {path!r} is gated on the hub; accept its licence and log in (HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{field}: {path!r} is neither a local directory nor a model on the hub") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise ValueError(f"{field}: {path!r}{rev} is not a local directory, not in the hub cache "
                         f"({hub_cache_dir()}), and {why}") from None
    except Exception as e:  # noqa: BLE001 - HTTP errors, disk full, ...: one line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{field}: downloading {path!r}{rev} from the hub failed: {msg}") from None
    if field == "model_path" and not os.path.isfile(os.path.join(local, "config.json")):
        raise ValueError(f"{field}: the hub snapshot of {path!r}{rev} has no config.json ({local})")
    return local


def load_chat_template(value: str) -> str:
    """The Jinja text of `--chat-template`: a file (Jinja, or JSON with a `chat_template` key), or the
    name of a template shipped here."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
        if value.endswith(".json"):
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise ValueError(f"chat_template: {value!r} is not valid JSON: {e}") from None
            text = obj.get("chat_template") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"chat_template: {value!r} has no 'chat_template' string")
        if not text.strip():
            raise ValueError(f"chat_template: {value!r} is empty")
        return text
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    raise ValueError(f"chat_template: {value!r} is neither a file nor a built-in template "
                     f"({', '.join(sorted(BUILTIN_CHAT_TEMPLATES))})")


def prepare_args(args):
    """ServerArgs with model_path (and tokenizer_path) as local directories, the hub id kept in
    hub_model_id (and as served_model_name when none is given), and chat_template checked."""
    if args.chat_template is not None:
        load_chat_template(args.chat_template)
    kw = {}
    if not os.path.isdir(args.model_path):
        kw["model_path"] = resolve_model_path(args.model_path, args.revision, "model_path")
        kw["hub_model_id"] = args.model_path
        if args.served_model_name is None:
            kw["served_model_name"] = args.model_path
    if args.tokenizer_path is not None and not os.path.isdir(args.tokenizer_path):
        kw["tokenizer_path"] = resolve_model_path(args.tokenizer_path, args.revision, "tokenizer_path")
    return args.replace(**kw) if kw else args
