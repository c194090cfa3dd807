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


def create_disaggregation(args, runner, page_size: int):
    """The scheduler's PD side for `args.disaggregation_mode` (None for a plain server)."""
    if args.disaggregation_mode == "null":
        return None
    from radixlm.disaggregation.decode import DecodeTransfers
    from radixlm.disaggregation.protocol import KVLayout

    layout = KVLayout.of_pool(runner.token_to_kv_pool)
    if args.disaggregation_mode == "prefill":
        from radixlm.disaggregation.prefill import PrefillBootstrap

        return PrefillBootstrap(args.host, args.disaggregation_bootstrap_port, args.disaggregation_timeout,
                                args.disaggregation_max_inflight_bytes, layout, page_size)
    return DecodeTransfers(args.disaggregation_timeout, layout, args.disaggregation_bootstrap_port)
