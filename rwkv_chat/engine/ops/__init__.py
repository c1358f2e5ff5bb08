"""Backends: the same functions (`wkv4`, `wkv5`, `wkv7`, and the fused single-token steps
`v7_step` / `group_norm_gate`, and the one-call layers `prepare_v7_layer` / `prepare_v6_layer`,
which answer None where a backend has none) in three kinds:

    torch_ref   plain torch on any device: the reference the others are tested against
    cpu         the C kernels (kernels/cpu/), when they build on this machine
    cuda        the CUDA kernels (kernels/), with RWKV_CUDA_ON=1 on a CUDA device

`select.backend(device)` picks one for a layer when the model is loaded; environment switches
(RWKV_CUDA_ON, RWKV_CPU_KERNELS) are read then and not again. The version modules call
`w.ops.wkv7(...)` and never ask which backend they have.
"""
