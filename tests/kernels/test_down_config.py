"""The DOWN form of the fp8 epilogue GEMM (the branch's down-projection in its K loop, kernels/triton_fp8_kernels.py)
adds x's and B H's tiles to every pipeline stage and t's accumulator to the registers: `down_config` keeps a shipped
config only where that fits. Offline sm_90 builds (where triton imports; no GPU needed): no spill stores, shared
memory within the 227 KiB a block has, at the ranks the DiT layers use (32; 96 for the fused q/k/v, padded 128)."""
import re

import pytest

from tests.kernels.sm90 import FP8_GEMM_ALIGNED as ALIGNED
from tests.kernels.sm90 import FP8_GEMM_SIG as SIG
from tests.kernels.sm90 import import_or_none

G = import_or_none("triton_fp8_kernels")


@pytest.mark.skipif(G is None, reason="triton does not import here")
@pytest.mark.parametrize("rank", [32, 96])
@pytest.mark.parametrize("cfg", range(8))
def test_kept_down_configs_do_not_spill_offline_sm90(cfg, rank):
    from tests.kernels.sm90 import compile_sm90, sass
    rp = G.rank_pad(rank)
    c = G.down_config(G.GEMM_CONFIGS[cfg], rank)
    if c is None:
        bm, bn, _, _, warps, *_ = G.GEMM_CONFIGS[cfg]
        assert (bm * bn + bm * rp) // (32 * warps) >= 128  # refused for its registers, not for shared memory alone
        return
    bm, bn, bk, gm, warps, stages, *early = c
    const = dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, RP=rp, HAS_BIAS=True, ASYM=True, HAS_LRB=True,
                 EARLY=bool(early and early[0]), DOWN=True)
    kern = compile_sm90(G.fp8_gemm_kernel, SIG, const, {"num_warps": warps, "num_stages": stages}, aligned=ALIGNED,
                        gluon=False)
    text, regs = sass(kern)
    assert not re.search(r"\bSTL\b", text), f"{c} rank pad {rp}: {regs} registers, spills"
    assert kern.metadata.shared <= 227 * 1024, f"{c}: {kern.metadata.shared} bytes of shared memory"


L = import_or_none("triton_lowrank")


@pytest.mark.skipif(L is None, reason="triton does not import here")
def test_down_split_by_rows_and_its_bound(monkeypatch):
    """`down_split`: K ranges for few rows (a divisor of K's tiles, ~128 programs in all), none for many;
    ROBUQ_LRB_DOWN_SPLIT bounds it (1: one program a row block streams all of K, no reduce kernel)."""
    monkeypatch.delenv("ROBUQ_LRB_DOWN_SPLIT", raising=False)
    assert L.down_split(256, 1152) == 9 and L.down_split(1000, 4608) == 6 and L.down_split(16384, 4608) == 1
    monkeypatch.setenv("ROBUQ_LRB_DOWN_SPLIT", "1")
    assert L.down_split(256, 1152) == 1 and L.down_split(1000, 4608) == 1
    monkeypatch.setenv("ROBUQ_LRB_DOWN_SPLIT", "4")
    assert L.down_split(256, 1152) == 3 and L.down_split(1000, 4608) == 4  # the largest divisor within the bound
