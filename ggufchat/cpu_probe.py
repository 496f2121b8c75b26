"""The child process behind `ggufchat.cpu_backend`: proves that one llama.cpp CPU variant runs on this machine.

    python -I cpu_probe.py LIBLLAMA VARIANT_LIBRARY      # e.g. .../site-packages/bin/libggml-cpu-zen4.so
    python -I cpu_probe.py LIBLLAMA built-in             # a build with its CPU code linked in

It registers the variant, then multiplies quantized weights by activations as a model's layers do (one token, and a
prompt's batch) in every buffer type the variant offers: plain, repacked, AMX. These are the kernels that trapped on
VMs that list AMX without running it; if this machine cannot run the variant's instructions, *this* process dies by
SIGILL, never the Space. Results are checked against numpy, so a variant that runs but computes garbage fails too.

Prints one JSON line: {"score": ..., "checked": [...], "seconds": ...}; a score of 0 means the variant itself declines
this CPU (its CPUID test) and nothing was run. Exit 1 with a message on stderr: wrong results. Standalone on purpose
(ctypes and numpy only), so that the Space's own imports never run in the child.
"""

from __future__ import annotations

import ctypes as C
import json
import sys
import time

import numpy as np

K, N = 256, 64  # K-quant blocks are 256 wide; llama.cpp's AMX kernels need the output rows in multiples of 32
BATCHES = (1, 16)  # one token (decode; AMX uses its VNNI path) and a batch (prompt; AMX uses its tile path)
# ggml_type ids and how far each may fall from float64 (relative, Frobenius): 4-bit rounding is ~0.1.
TYPES = {"F16": (1, 0.01), "Q4_0": (2, 0.2), "Q8_0": (8, 0.02), "Q4_K": (12, 0.15), "Q5_K": (13, 0.08),
         "Q6_K": (14, 0.04)}
SAME = 0.01  # the same weights in another buffer type (repacked, AMX) must give the same product to this
F32, CPU_DEVICE = 0, 0  # GGML_TYPE_F32, GGML_BACKEND_DEVICE_TYPE_CPU


class InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


def bind(lib: C.CDLL) -> C.CDLL:
    P, I64, Z = C.c_void_p, C.c_int64, C.c_size_t
    for name, restype, argtypes in (
        ("ggml_init", P, [InitParams]), ("ggml_free", None, [P]),
        ("ggml_tensor_overhead", Z, []), ("ggml_graph_overhead", Z, []),
        ("ggml_new_tensor_2d", P, [P, C.c_int, I64, I64]), ("ggml_mul_mat", P, [P, P, P]),
        ("ggml_new_graph", P, [P]), ("ggml_build_forward_expand", None, [P, P]),
        ("ggml_row_size", Z, [C.c_int, I64]), ("ggml_quantize_chunk", Z, [C.c_int, P, P, I64, I64, I64, P]),
        ("ggml_backend_load", P, [C.c_char_p]), ("ggml_backend_reg_dev_get", P, [P, Z]),
        ("ggml_backend_dev_by_type", P, [C.c_int]), ("ggml_backend_dev_backend_reg", P, [P]),
        ("ggml_backend_reg_get_proc_address", P, [P, C.c_char_p]),
        ("ggml_backend_dev_init", P, [P, C.c_char_p]), ("ggml_backend_dev_buffer_type", P, [P]),
        ("ggml_backend_dev_supports_op", C.c_bool, [P, P]), ("ggml_backend_buft_name", C.c_char_p, [P]),
        ("ggml_backend_alloc_ctx_tensors_from_buft", P, [P, P]), ("ggml_backend_buffer_free", None, [P]),
        ("ggml_backend_tensor_set", None, [P, P, Z, Z]), ("ggml_backend_tensor_get", None, [P, P, Z, Z]),
        ("ggml_backend_graph_compute", C.c_int, [P, P]), ("ggml_backend_free", None, [P]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def product(g: C.CDLL, backend, device, buft, type_id: int, weights: bytes, x: np.ndarray) -> np.ndarray | None:
    """x @ W.T with W (already in `type_id`'s bytes) in buffer type `buft`; None where llama.cpp would not put a
    weight of this type there (it asks the device the same question before placing a model's weights)."""
    def context(n_tensors: int, extra: int = 0):
        return g.ggml_init(InitParams(n_tensors * g.ggml_tensor_overhead() + extra, None, True))

    m = x.shape[0]
    wctx, xctx, gctx = context(1), context(2), context(0, g.ggml_graph_overhead())
    buffers = []
    try:
        w = g.ggml_new_tensor_2d(wctx, type_id, K, N)
        xt = g.ggml_new_tensor_2d(xctx, F32, K, m)
        y = g.ggml_mul_mat(xctx, w, xt)
        graph = g.ggml_new_graph(gctx)
        g.ggml_build_forward_expand(graph, y)
        buffers.append(g.ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft))
        buffers.append(g.ggml_backend_alloc_ctx_tensors_from_buft(xctx, g.ggml_backend_dev_buffer_type(device)))
        if not all(buffers):
            raise RuntimeError("could not allocate the probe's tensors")
        if not g.ggml_backend_dev_supports_op(device, y):
            return None
        g.ggml_backend_tensor_set(w, weights, 0, len(weights))
        g.ggml_backend_tensor_set(xt, x.ctypes.data, 0, x.nbytes)
        if g.ggml_backend_graph_compute(backend, graph) != 0:
            raise RuntimeError("ggml_backend_graph_compute failed")
        out = np.empty((m, N), dtype=np.float32)
        g.ggml_backend_tensor_get(y, out.ctypes.data, 0, out.nbytes)
        return out
    finally:
        for buffer in buffers:
            if buffer:
                g.ggml_backend_buffer_free(buffer)
        for ctx in (wctx, xctx, gctx):
            g.ggml_free(ctx)


def main(libllama: str, variant: str) -> int:
    start = time.perf_counter()
    g = bind(C.CDLL(libllama))  # ggml's functions, from the very libggml that libllama links
    if variant == "built-in":
        score, device = 1, g.ggml_backend_dev_by_type(CPU_DEVICE)
        if not device:
            raise SystemExit("this llama.cpp has no CPU backend linked in")
    else:
        score = C.CDLL(variant).ggml_backend_score()  # its CPUID test, as llama.cpp's own loader asks
        if score == 0:
            print(json.dumps({"score": 0, "checked": [], "seconds": time.perf_counter() - start}))
            return 0
        reg = g.ggml_backend_load(variant.encode())
        if not reg:
            raise SystemExit(f"llama.cpp could not load {variant}")
        device = g.ggml_backend_reg_dev_get(reg, 0)
    backend = g.ggml_backend_dev_init(device, None)
    reg = g.ggml_backend_dev_backend_reg(device)
    # Two threads: the kernels' per-thread set-up (AMX configures its tiles per thread) runs more than once.
    if set_threads := g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads"):
        C.CFUNCTYPE(None, C.c_void_p, C.c_int)(set_threads)(backend, 2)
    bufts = [g.ggml_backend_dev_buffer_type(device)]
    if get_extra := g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts"):
        extra = C.CFUNCTYPE(C.POINTER(C.c_void_p), C.c_void_p)(get_extra)(device)
        i = 0
        while extra and extra[i]:  # a NULL-terminated array
            bufts.append(extra[i])
            i += 1

    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((N, K), dtype=np.float32)
    checked, wrong = [], []
    for type_name, (type_id, tolerance) in TYPES.items():
        weights = C.create_string_buffer(g.ggml_row_size(type_id, K) * N)
        g.ggml_quantize_chunk(type_id, w32.ctypes.data, weights, 0, N, K, None)
        for m in BATCHES:
            x = rng.standard_normal((m, K), dtype=np.float32)
            reference = x.astype(np.float64) @ w32.T.astype(np.float64)
            plain = None
            for buft in bufts:
                got = product(g, backend, device, buft, type_id, weights.raw, x)
                if got is None:
                    continue
                name = f"{g.ggml_backend_buft_name(buft).decode()} {type_name}x{m}"
                against, limit = (reference, tolerance) if plain is None else (plain, SAME)
                error = float(np.linalg.norm(got - against) / np.linalg.norm(against))
                if not np.isfinite(got).all() or error > limit:
                    wrong.append(f"{name}: relative error {error:.3g} > {limit}")
                plain = got if plain is None else plain
                checked.append(name)
    g.ggml_backend_free(backend)
    if wrong:
        print("wrong results: " + "; ".join(wrong), file=sys.stderr)
        return 1
    print(json.dumps({"score": score, "checked": checked, "seconds": round(time.perf_counter() - start, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
