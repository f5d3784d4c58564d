"""DRAM read rate for the bytes the bmm LoRA path reads per decode step at 64 distinct (rank 16 q,k,v,o, W1; issue 16)."""
import time, torch
torch.set_num_threads(2)
L, n, h, r = 4, 64, 256, 16
a_qkv = torch.randn(L, n, h, 3 * r); b_qkv = [torch.randn(L, n, r, h) for _ in range(3)]
a_o = torch.randn(L, n, h, r); b_o = torch.randn(L, n, r, h)
ts = [a_qkv, *b_qkv, a_o, b_o]
nbytes = sum(t.numel() * 4 for t in ts)
big = torch.randn(64 * 2**20 // 4)  # 64 MB to evict caches between passes
def once():
    big.sum()
    t = time.perf_counter()
    for x in ts: x.sum()
    return time.perf_counter() - t
def once_bmm():
    big.sum()
    x = torch.randn(n, 1, h)
    t = time.perf_counter()
    for l in range(L):
        hq = torch.bmm(x, a_qkv[l])
        for i, b in enumerate(b_qkv): torch.bmm(hq[:, :, i * r:(i + 1) * r], b[l])
        ho = torch.bmm(x, a_o[l]); torch.bmm(ho, b_o[l])
    return time.perf_counter() - t
for f, name in ((once, "sum over the weights"), (once_bmm, "the bmm path's 24 GEMMs, cold")):
    ts_ = sorted(f() for _ in range(30))
    med = ts_[15]
    print(f"{name}: {nbytes/1e6:.1f} MB in {med*1e3:.2f} ms = {nbytes/med/1e9:.1f} GB/s (median of 30)")
