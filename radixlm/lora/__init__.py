"""Multi-LoRA serving: many fine-tuned variants (PEFT LoRA adapters) of one base model in one server.

adapter.py reads and checks an adapter (host memory); layers.py wraps the base model's packed linear
layers and adds each row's LoRA delta; ops.py / triton_ops.py are the segmented LoRA GEMMs (plain
reference, segment-grouped torch, Triton); manager.py owns the bounded pool of device slots and builds
each step's `LoRABatchInfo`; server.py loads and unloads adapters at run time. The scheduler keeps the
distinct adapters of a batch within the slots (sched/prefill.py) and gives each adapter its own
radix-cache namespace (sched/scheduler.py).
"""
