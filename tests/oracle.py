"""The reference implementation (`rwkv==0.8.32`, ChatRWKV's pip package) as a test oracle.

Each call runs the oracle in a fresh subprocess, because the oracle reads its environment
variables once, at import (`RWKV_V7_ON` even replaces the `RWKV` class with the v7 one), and
keeps module-level globals. Requests and results travel through temp files (torch.save, loaded
back with weights_only=True). In the subprocess:

* `torch.set_flush_denormal(True)` (the oracle's v6/v7 CPU path is 60-70x slower without it);
* `RWKV_CUDA_ON=0`, `RWKV_JIT_ON` as given (default "1", what users run); the v7 code always
  scripts its functions whatever `RWKV_JIT_ON` says;
* the oracle's `model.py` is loaded as two separate module copies when needed: one imported
  with `RWKV_V7_ON=0` (v4/v5.2/v6) and one with `RWKV_V7_ON=1` (v7), so a single subprocess
  can serve every version. A file is sent to the v7 copy when it has a `blocks.0.att.r_k` key;
* `RWKV_RESCALE_LAYER` is passed through from the caller's environment (the oracle defaults
  it to 6 when the strategy mentions fp16, else 0);
* one torch thread by default, and the oracle loader's explicit gc.collect() calls skipped:
  both only save time (tiny models load ~20x faster on a busy 2-core machine).

Paths: the v7 class always appends ".pth" to the name it is given and the v4-v6 class appends
it when missing. Here `model_path` may be the file itself (any name: a file not ending in
".pth" is reached through a temporary *.pth symlink) or the name without ".pth".

Tuned states (`state_file`): the oracle has no API to load them, so the initial state is built
here in the oracle's own state-list layout, `[att_x, wkv, ffn_x] * n_layer`:
  - att_x / ffn_x: zeros, in the layer's activation dtype and device (as the oracle makes them);
  - wkv: the file's `blocks.{i}.att.time_state` ([H, N, N], stored [h][v][k]) converted
    straight to float32 -- for v5.2/v6 transposed (1, 2) into the oracle's [h][k][v] layout
    (exactly what the oracle does itself for a checkpoint with a merged state), for v7 as is.
Any dict with those keys works as a state file, including a checkpoint with a merged state.
A checkpoint with a merged state and no `state_file`: the v5.2/v6 oracle starts from the
merged state by itself; the v7 oracle silently ignores it (starts from zeros).

Other oracle behaviours worth knowing (rwkv 0.8.32):
  - v4-v6 layer-norm the embedding in the FILE's dtype before converting to the strategy's: a
    bf16 file run as "cpu fp32" differs from the same weights stored fp32 by ~0.015 in the
    logits (v7 converts first: no difference). Compare engines on float32 files.
  - v4-v6 detect v5.2 (and set n_head) only at an `att.time_decay` key met after `ln_x`; in the
    official key order a ONE-layer v5.2 file reads as v5.1 and fails at its first forward.
  - v4-v6 squeeze every `.time_*` tensor: a merged time_state of a ONE-head model loses its
    head axis and the first forward fails; merged states also pass through the strategy's
    activation dtype first (fp16 rounding with an fp16 strategy).
  - forward() mutates and returns the state list it was given; a one-token batch takes the
    single-token path and ignores full_output.

Logits come back as float32 CPU tensors: [vocab] per batch, or [T, vocab] with full_output
(also for a one-token batch, where the oracle itself returns [vocab]; it is reshaped to [1, vocab]).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rwkv_chat.testing import reference
from rwkv_chat.testing.reference import reference_env

ORACLE_TIMEOUT_S = 900
_ROOT = Path(__file__).resolve().parents[1]
_LOGITS_KEYS = {"model_path", "strategy", "token_batches", "state_file", "full_output"}
_INFO_KEYS = {"info", "model_path", "strategy"}


class OracleError(RuntimeError):
    """The oracle subprocess failed; the message carries the end of its output."""


def oracle_logits(
    model_path: str,
    strategy: str,
    token_batches: list[list[int]],
    state_file: str | None = None,
    full_output: bool = False,
    *,
    jit: bool = True,
    threads: int = 1,
) -> list[torch.Tensor]:
    """Feed each batch of `token_batches` in turn (one `model.forward(batch, state,
    full_output=...)` call each, carrying the state) and return the float32 logits of each call."""
    request = dict(
        model_path=model_path, strategy=strategy, token_batches=token_batches,
        state_file=state_file, full_output=full_output,
    )
    return oracle_run([request], jit=jit, threads=threads)[0]


def oracle_logits_many(requests: list[dict], *, jit: bool = True, threads: int = 1) -> list[list[torch.Tensor]]:
    """Several `oracle_logits` requests in ONE subprocess (saves the interpreter and oracle
    start-up, a few seconds each). Each request is a dict with `model_path`, `strategy`,
    `token_batches` and optionally `state_file`, `full_output`. Returns one list of logits per
    request, in order."""
    return oracle_run(requests, jit=jit, threads=threads)


def oracle_model_info(model_path: str, strategy: str = "cpu fp32", **options) -> dict:
    """What the oracle makes of a checkpoint: {"version": "4" | "5.1" | "5.2" | "6" | "7" (its
    detection, as a string), "n_layer", "n_embd", "n_head" (None when it set none), "head_size"}."""
    return oracle_run([dict(info=True, model_path=model_path, strategy=strategy)], **options)[0]


def oracle_run(requests: list[dict], *, jit: bool = True, threads: int = 1) -> list:
    """Run a mix of logits requests (see `oracle_logits_many`) and info requests
    ({"info": True, "model_path": ..., "strategy": ...}, see `oracle_model_info`) in one
    subprocess. Models are loaded once per (path, strategy) and reused across requests.

    `jit` sets RWKV_JIT_ON for v4-v6 (v7 always scripts). `threads` is torch's thread count in
    the subprocess: 1 by default, far faster for the tiny test models on a busy machine (idle
    OpenMP threads spin on shared cores); raise it for big models."""
    normalized = [_normalize_request(request) for request in requests]
    if not normalized:
        return []
    env = reference_env(cuda_on=False, jit=jit)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))  # this checkout's rwkv_chat
    with tempfile.TemporaryDirectory(prefix="rwkv-oracle-") as folder:
        request_path = Path(folder, "requests.pt")
        result_path = Path(folder, "results.pt")
        torch.save(normalized, request_path)
        command = [sys.executable, os.path.abspath(__file__), str(request_path), str(result_path), str(int(threads))]
        try:
            process = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=ORACLE_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise OracleError(f"oracle subprocess ran over {ORACLE_TIMEOUT_S} s") from error
        if process.returncode != 0 or not result_path.exists():
            output = (process.stdout + "\n" + process.stderr)[-6000:]
            raise OracleError(f"oracle subprocess failed (exit {process.returncode}):\n{output}")
        return torch.load(result_path, weights_only=True)


def _normalize_request(request: dict) -> dict:
    if request.get("info"):
        unknown = set(request) - _INFO_KEYS
        if unknown:
            raise ValueError(f"unknown oracle info request keys: {sorted(unknown)}")
        return dict(
            info=True,
            model_path=os.path.abspath(str(request["model_path"])),
            strategy=str(request.get("strategy", "cpu fp32")),
        )
    unknown = set(request) - _LOGITS_KEYS
    if unknown:
        raise ValueError(f"unknown oracle request keys: {sorted(unknown)}")
    batches = [[int(token) for token in batch] for batch in request["token_batches"]]
    if not batches or any(len(batch) == 0 for batch in batches):
        raise ValueError("token_batches must be a non-empty list of non-empty token lists")
    state_file = request.get("state_file")
    return dict(
        info=False,
        model_path=os.path.abspath(str(request["model_path"])),
        strategy=str(request["strategy"]),
        token_batches=batches,
        state_file=os.path.abspath(str(state_file)) if state_file is not None else None,
        full_output=bool(request.get("full_output", False)),
    )


# ---------------------------------------------------------------------------------------------
# Subprocess side (runs with `python oracle.py REQUESTS RESULTS`; imports torch, rwkv and
# rwkv_chat.testing.reference, which opens the reference as every caller does)


class _OracleSession:
    def __init__(self):
        self.modules = {}  # v7 flag -> module copy
        self.models = {}  # (path, strategy) -> (model, is_v7, v7 globals)
        self.link_folder = None  # holds *.pth symlinks for files named otherwise

    def model(self, path: str, strategy: str):
        key = (path, strategy)
        if key not in self.models:
            file_path = self.pth_path(path)
            is_v7 = reference.is_v7_checkpoint(file_path)
            if is_v7 not in self.modules:
                self.modules[is_v7] = reference.load_reference_module(is_v7)
            module = self.modules[is_v7]
            model = reference.open_reference_model(module, file_path, strategy, is_v7)
            v7_globals = (module.DTYPE, module.DEVICE) if is_v7 else None
            self.models[key] = (model, is_v7, v7_globals)
        model, is_v7, v7_globals = self.models[key]
        if is_v7:
            # the v7 module keeps DTYPE/DEVICE as globals set by the last constructor; put back
            # this model's, as its constructor left them
            module = self.modules[True]
            module.DTYPE, module.DEVICE = v7_globals
        return model, is_v7

    def pth_path(self, path: str) -> str:
        """A path ending in ".pth" for `path` (the oracle insists on the suffix): the path itself,
        path + ".pth" when only that exists, or a symlink named *.pth to it."""
        if path.endswith(".pth") and os.path.isfile(path):
            return path
        if not os.path.exists(path) and os.path.isfile(path + ".pth"):
            return path + ".pth"
        if not os.path.isfile(path):
            also_tried = "" if path.endswith(".pth") else f" (nor {path}.pth)"
            raise FileNotFoundError(f"no checkpoint at {path}{also_tried}")
        if self.link_folder is None:
            self.link_folder = tempfile.mkdtemp(prefix="rwkv-oracle-links-")
        link = os.path.join(self.link_folder, f"model{len(os.listdir(self.link_folder))}.pth")
        os.symlink(path, link)
        return link

    @staticmethod
    def initial_state(model, is_v7: bool, state_file: str):
        """The oracle's state list with the tuned state's wkv matrices (see the module doc)."""
        tuned = torch.load(state_file, map_location="cpu", weights_only=True)
        if is_v7:
            state = model.generate_zero_state()
            for layer in range(model.n_layer):
                wkv = state[layer * 3 + 1]
                time_state = tuned[f"blocks.{layer}.att.time_state"]
                state[layer * 3 + 1] = time_state.to(device=wkv.device, dtype=torch.float32).contiguous()
            return state
        if model.version == 4:
            raise ValueError("RWKV v4 has no tuned states")
        args = model.args
        state = []
        for layer in range(args.n_layer):
            plan = model.strategy[layer]
            time_state = tuned[f"blocks.{layer}.att.time_state"]
            state += [
                torch.zeros(args.n_embd, dtype=plan.atype, device=plan.device),
                time_state.transpose(1, 2).to(device=plan.device, dtype=torch.float32).contiguous(),
                torch.zeros(args.n_embd, dtype=plan.atype, device=plan.device),
            ]
        return state

    def info(self, request: dict) -> dict:
        model, is_v7 = self.model(request["model_path"], request["strategy"])
        if is_v7:
            return dict(
                version="7", n_layer=model.n_layer, n_embd=model.n_embd,
                n_head=model.n_head, head_size=model.head_size,
            )
        args = model.args
        n_head = getattr(args, "n_head", None)
        return dict(
            version=f"{model.version:g}", n_layer=args.n_layer, n_embd=args.n_embd, n_head=n_head,
            head_size=args.n_att // n_head if n_head else None,
        )

    def run(self, request: dict):
        if request["info"]:
            return self.info(request)
        model, is_v7 = self.model(request["model_path"], request["strategy"])
        state = None
        if request["state_file"] is not None:
            state = self.initial_state(model, is_v7, request["state_file"])
        outputs = []
        for batch in request["token_batches"]:
            logits, state = model.forward(batch, state, full_output=request["full_output"])
            logits = logits.detach().to(device="cpu", dtype=torch.float32).clone()
            if request["full_output"] and logits.dim() == 1:
                logits = logits.unsqueeze(0)
            outputs.append(logits)
        return outputs


def _child_main(request_path: str, result_path: str, threads: str) -> None:
    torch.set_num_threads(max(1, int(threads)))
    torch.set_flush_denormal(True)
    requests = torch.load(request_path, weights_only=True)
    session = _OracleSession()
    try:
        with torch.no_grad():
            results = [session.run(request) for request in requests]
    finally:
        if session.link_folder is not None:
            shutil.rmtree(session.link_folder, ignore_errors=True)
    temp_path = result_path + ".tmp"
    torch.save(results, temp_path)
    os.replace(temp_path, result_path)


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2], sys.argv[3])
