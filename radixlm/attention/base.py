"""The attention-backend contract.

A backend gets, per step, `init_forward_metadata(fb)` once, then for every layer
`forward(q, k, v, layer, fb)`: it stores the new tokens' K/V at `fb.out_cache_loc` in the pool and
returns attention over each request's slots `req_to_token[row, :seq_len]` (causal for the new
tokens). q: [T, Hq*D], k/v: [T, Hk*D] -> [T, Hq*D].
"""

from __future__ import annotations

import torch

from radixlm.attention.forward_context import ForwardBatch


class AttentionBackend:
    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        pass

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: ForwardBatch) -> torch.Tensor:
        if fb.forward_mode.is_decode:
            return self.forward_decode(q, k, v, layer, fb)
        return self.forward_extend(q, k, v, layer, fb)

    def forward_extend(self, q, k, v, layer, fb: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError

    def forward_decode(self, q, k, v, layer, fb: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError
