"""Prefill/decode disaggregation (SGLang's PD mode, driven by `sglang-router --pd-disaggregation`).

The router sends each request, with `bootstrap_host`, `bootstrap_port` and `bootstrap_room` added,
to one prefill worker and one decode worker. The decode worker reserves KV slots for the prompt and
registers the room with the prefill worker's bootstrap server (`prefill.PrefillBootstrap`, on
`--disaggregation-bootstrap-port`); the prefill worker computes the prompt (radix cache on), streams
the KV to the decode worker over that connection (`transfer.py`: per-layer, page-aligned chunks of
raw bytes under a small header, credit-based so only a bounded number of bytes is unacknowledged),
then the first token; the decode worker (`decode.DecodeTransfers`) writes the KV into its reserved
slots and the request joins its running batch. Every wait has a deadline
(`--disaggregation-timeout`); a failure aborts only the request it concerns and frees its KV.

Messages are defined in `protocol.py`; nothing here is pickled.
"""
