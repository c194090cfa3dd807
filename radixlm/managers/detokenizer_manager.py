"""DetokenizerManager: turns token ids into text, in its own child process (the server) or in-process
(the offline Engine, one per generate call).

In: `BatchTokenIDOut` from the scheduler (or one ReqOutput with its DetokenizeParams). Out:
`BatchStrOut` to the tokenizer manager, one `StrOut` per request output with the UTF-8-safe text
delta (see detokenizer.py). Owns one IncrementalDetokenizer per live request and drops it when the
request finishes.
Nothing that arrives is fatal: an undecodable message or one of another type is logged and
dropped, and a request whose text cannot be decoded still gets its tokens and finish reason
(with an empty text delta), so its client is answered instead of waiting forever.
"""

from __future__ import annotations

import logging
from typing import Dict

from radixlm.core import ReqOutput
from radixlm.managers.detokenizer import IncrementalDetokenizer
from radixlm.managers.io_struct import BatchStrOut, BatchTokenIDOut, DetokenizeParams, StrOut, decode_or_drop, encode

logger = logging.getLogger(__name__)


class DetokenizerManager:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: Dict[str, IncrementalDetokenizer] = {}

    def detokenize(self, out: ReqOutput, params: DetokenizeParams) -> StrOut:
        """One request output with its text delta ("" without a tokenizer, or when decoding fails)."""
        delta = ""
        if self.tokenizer is not None:
            try:
                st = self.states.get(out.rid)
                if st is None:
                    st = self.states[out.rid] = IncrementalDetokenizer(self.tokenizer, params)
                delta = st.add(out.new_token_ids, out.finished_reason)
            except Exception:  # noqa: BLE001 - one request's text is lost, not the process
                logger.exception("detokenizing request %r failed; its text delta is dropped", out.rid)
        if out.finished_reason is not None:
            self.states.pop(out.rid, None)
        return StrOut(out.rid, delta, out)

    def handle(self, batch: BatchTokenIDOut) -> BatchStrOut:
        return BatchStrOut([self.detokenize(out, p) for out, p in zip(batch.outputs, batch.detok_params)])


def run_detokenizer_process(args, ipc, parent_pid: int) -> None:
    import time

    import zmq

    from radixlm.managers.scheduler_process import exit_with_parent, process_start_time, startup_timeline
    from radixlm.managers.tokenizer import get_tokenizer

    marks = {"detokenizer.imported": time.time()}
    exit_with_parent(parent_pid)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s detokenizer] %(message)s",
                        force=True)  # forked: not the parent's handlers
    tokenizer = None if args.skip_tokenizer_init else get_tokenizer(args.resolved_tokenizer_path,
                                                                    args.trust_remote_code)
    marks["detokenizer.tokenizer"] = time.time()
    logger.info("start-up timeline (s since launch): %s", startup_timeline(marks, process_start_time(parent_pid)))
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.bind(ipc.detokenizer_input)
    send = ctx.socket(zmq.PUSH)
    send.connect(ipc.tokenizer_input)
    mgr = DetokenizerManager(tokenizer)
    while True:
        msg = decode_or_drop(recv.recv(), "detokenizer", logger)
        if msg is None:
            continue
        if not isinstance(msg, BatchTokenIDOut):
            logger.error("detokenizer dropped an unexpected message %s", type(msg).__name__)
            continue
        try:
            out = mgr.handle(msg)
        except Exception:  # noqa: BLE001 - a malformed batch is dropped, the process lives on
            logger.exception("detokenizer dropped a malformed BatchTokenIDOut")
            continue
        send.send(encode(out))
