"""Speculative decoding: drafts proposed cheaply, verified by one target forward per step.

`ngram.NgramDrafter` (NGRAM: n-gram matches in the request's own tokens, no model) and
`standalone.StandaloneDrafter` (STANDALONE: a small draft model with its own KV pool) propose a chain
of draft tokens per request; `verify.py` owns the acceptance rules (greedy: the longest prefix equal to
the target's argmax; sampling: rejection sampling that keeps the target distribution), each as a plain
per-request reference with a batched path beside it; `worker.SpecDecoder` is the scheduler's decode
step when speculating: drafts, one extend forward over [last token + drafts] per request, acceptance,
committing tokens one by one through the OutputProcessor (so every stop check runs per token) and
giving back the slots of rejected drafts.
"""
