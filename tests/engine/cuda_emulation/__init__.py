"""Host emulation of the CUDA kernels for the CPU tests (see emulator.py)."""
