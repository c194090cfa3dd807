"""Loading and unloading adapters at run time, on both sides of the server.

Scheduler side (`handle_lora_request`, `load_adapter_in_scheduler`, `unload_adapter_in_scheduler`):
runs between steps on the scheduler's thread; an unload is refused while a queued or running request
uses the adapter (the client retries when they finish). Server side (`LoRARegistry`): the adapter
names the tokenizer manager accepts in `lora_path` (so an unknown name is a 400 before anything is
queued), kept in step with the scheduler's answers, and the calls behind the HTTP routes
`/load_lora_adapter` and `/unload_lora_adapter` (entrypoints/lora_routes.py).
"""

from __future__ import annotations

from typing import Dict

from radixlm.lora.adapter import LoRAError


def _manager(s):
    lm = getattr(s.runner, "lora_manager", None)
    if lm is None:
        raise LoRAError("LoRA is not enabled on this server (--enable-lora / --lora-paths)")
    return lm


def loaded(s) -> Dict[str, str]:
    return {n: i["path"] for n, i in _manager(s).info().items()}


def load_adapter_in_scheduler(s, name: str, path: str) -> Dict[str, str]:
    _manager(s).load(name, path)
    return loaded(s)


def unload_adapter_in_scheduler(s, name: str) -> Dict[str, str]:
    lm = _manager(s)
    if name not in lm.names():
        raise LoRAError(f"lora_name: no adapter named {name!r} is loaded")
    users = [r for r in list(s.waiting) + s.live_reqs() if r.lora_path == name]
    if users:
        raise LoRAError(f"lora_name: adapter {name!r} is in use by {len(users)} request(s); unload it after they "
                        "finish")
    lm.unload(name)
    return loaded(s)


def handle_lora_request(s, msg):
    """A LoRAAdapterReq from the tokenizer manager -> its LoRAAdapterReqOutput (never raises)."""
    from radixlm.managers.io_struct import LoRAAdapterReqOutput

    try:
        if msg.action == "load":
            names = load_adapter_in_scheduler(s, msg.lora_name, msg.lora_path)
        elif msg.action == "unload":
            names = unload_adapter_in_scheduler(s, msg.lora_name)
        else:
            raise LoRAError(f"unknown LoRA action {msg.action!r}")
        return LoRAAdapterReqOutput(True, "", names, msg.req_id)
    except Exception as e:  # noqa: BLE001 - a bad adapter is the client's 400, not the scheduler's end
        return LoRAAdapterReqOutput(False, str(e), {}, msg.req_id)


class LoRARegistry:
    """The server's view of the loaded adapters (names -> paths)."""

    def __init__(self, args):
        from radixlm.lora.manager import parse_lora_paths

        self.enabled = bool(args.enable_lora)
        self.adapters: Dict[str, str] = parse_lora_paths(args.lora_paths) if self.enabled else {}
        self.unloading: set = set()

    def names(self):
        return set(self.adapters) - self.unloading


async def load_lora_adapter(tm, body: dict):
    from radixlm.managers.io_struct import LoRAAdapterReq

    reg = tm.lora
    name, path = body.get("lora_name"), body.get("lora_path")
    if not reg.enabled:
        raise LoRAError("LoRA is not enabled on this server (--enable-lora / --lora-paths)")
    if not isinstance(name, str) or not name or ":" in name or len(name) > 256:
        raise LoRAError("lora_name: a non-empty string without ':' (at most 256 characters) is required")
    if not isinstance(path, str) or not path:
        raise LoRAError("lora_path: the adapter directory is required")
    out = await tm._control(LoRAAdapterReq("load", name, path))
    if out.success:
        reg.adapters = dict(out.loaded_adapters)
    return out


async def unload_lora_adapter(tm, body: dict):
    from radixlm.managers.io_struct import LoRAAdapterReq

    reg = tm.lora
    name = body.get("lora_name")
    if not reg.enabled:
        raise LoRAError("LoRA is not enabled on this server (--enable-lora / --lora-paths)")
    if not isinstance(name, str) or name not in reg.adapters:
        raise LoRAError(f"lora_name: no adapter named {str(name)[:200]!r} is loaded")
    users = sum(1 for st in list(tm.states.values()) if st.msg.lora_path == name and not st.finished)
    if users:
        raise LoRAError(f"lora_name: adapter {name!r} is in use by {users} request(s); unload it after they finish")
    reg.unloading.add(name)  # no new request takes it while the scheduler answers
    try:
        out = await tm._control(LoRAAdapterReq("unload", name))
    finally:
        reg.unloading.discard(name)
    if out.success:
        reg.adapters = dict(out.loaded_adapters)
    return out
