"""CPU cost of one eager robuq::qlinear call and of its parts, at M = 16 (launch-bound), W4A4+H128, 1152 x 1152.
    python benchmarks/bench_call_overhead.py        (needs CUDA)
"""
import time, os, sys
import torch, torch.nn.functional as F
sys.path.insert(0, os.getcwd())
import robuq_fx  # noqa
from robuq_fx.modules import PackedLinear
from robuq_fx.spec import LayerSpec
from robuq_fx.kernels import triton_fp8 as T, registry as R, triton_act_quant as A
from robuq_fx.kernels.qlinear import qlinear_impl
import triton
torch.manual_seed(0)
k, n, m = 1152, 1152, 16
lin = torch.nn.Linear(k, n).cuda().to(torch.bfloat16)
pl = PackedLinear.from_float(lin.weight, lin.bias, None, None, LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128))
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
def per_call(fn, n=3000):
    for _ in range(50): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e6
args = R.QLinearArgs(pl.qweight, pl.w_scale, pl.bias, None, None, n, k, 4.0, 4, 128, True, "absmax")
impl = qlinear_impl
res = {}
with torch.no_grad():
    res["module forward (op)"] = per_call(lambda: pl(x))
    res["torch.ops.robuq.qlinear"] = per_call(lambda: torch.ops.robuq.qlinear(x, pl.qweight, pl.w_scale, pl.bias, None, None, *pl.op_args()))
    res["python impl (no dispatcher)"] = per_call(lambda: impl(x, pl.qweight, pl.w_scale, pl.bias, None, None, *pl.op_args()))
    res["QLinearArgs()"] = per_call(lambda: R.QLinearArgs(pl.qweight, pl.w_scale, pl.bias, None, None, n, k, 4.0, 4, 128, True, "absmax"))
    res["select()"] = per_call(lambda: R.select(x, args))
    res["dequant_qlinear()"] = per_call(lambda: T.dequant_qlinear(x, args))
    res["fp8_qlinear()"] = per_call(lambda: T.fp8_qlinear(x, args))
    res["act_quant()"] = per_call(lambda: T.act_quant(x, 128, 4, True))
    out = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn); sc = torch.empty(m, device="cuda"); lo = torch.empty(m, device="cuda")
    plan = T.quant_plan(k, 128, m)
    res["launch_act_quant (prealloc)"] = per_call(lambda: A.launch_act_quant(x, out, sc, lo, m, m, 0.088, 7.0, 0.0, 128, plan, True, False))
    res["3x torch.empty"] = per_call(lambda: (torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn), torch.empty(m, device="cuda"), torch.empty(m, device="cuda")))
    res["F.linear"] = per_call(lambda: F.linear(x, lin.weight))
    w8 = torch.randint(-7, 8, (n, k), device="cuda").to(torch.bfloat16).to(torch.float8_e4m3fn); sw = torch.rand(n, device="cuda")
    codes = torch.zeros(16, k, device="cuda", dtype=torch.float8_e4m3fn); sx = torch.rand(16, device="cuda")
    res["_scaled_mm"] = per_call(lambda: torch._scaled_mm(codes, w8.t(), scale_a=sx.view(-1, 1), scale_b=sw.view(1, -1), out_dtype=torch.bfloat16, use_fast_accum=True))
    res["os.environ.get x5"] = per_call(lambda: [os.environ.get("ROBUQ_KERNEL") for _ in range(5)])
for k_, v in res.items():
    print(f"{k_:40s} {v:8.1f} us")
