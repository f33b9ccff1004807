"""One-off probe of PyTorch's built-in FA2 varlen ops on the device (shapes, GQA, empty segments)."""
import torch

dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name())
T, Hq, Hkv, D = 256, 4, 2, 64
q = torch.randn(T, Hq, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(T, Hkv, D, device=dev, dtype=torch.bfloat16)
v = torch.randn(T, Hkv, D, device=dev, dtype=torch.bfloat16)
cu = torch.tensor([0, 100, 256], device=dev, dtype=torch.int32)
f = torch.ops.aten._flash_attention_forward
b = torch.ops.aten._flash_attention_backward
out, lse, rng, unused, _ = f(q, k, v, cu, cu, 156, 156, 0.0, True, False, scale=0.125)
print("out", out.shape, "lse", lse.shape, lse.dtype, "rng", rng.shape, rng.dtype, "unused", unused.shape, unused.dtype)
# reference with repeat
def ref(q, k, v, cu_q, cu_k, causal):
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i+1]].float().transpose(0, 1); ks = k[cu_k[i]:cu_k[i+1]].float().transpose(0, 1); vs = v[cu_k[i]:cu_k[i+1]].float().transpose(0, 1)
        g = qs.shape[0] // ks.shape[0]
        ks = ks.repeat_interleave(g, 0); vs = vs.repeat_interleave(g, 0)
        s = qs @ ks.transpose(1, 2) * 0.125
        if causal:
            nq, nk = s.shape[1], s.shape[2]
            mask = torch.ones(nq, nk, dtype=torch.bool, device=dev).tril(nk - nq)
            s = s.masked_fill(~mask, float("-inf"))
        lses.append(torch.logsumexp(s, -1)); outs.append((s.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses, 1)
ro, rl = ref(q, k, v, cu.tolist(), cu.tolist(), True)
print("causal gqa fwd err", (out.float() - ro).abs().max().item(), (lse - rl).abs().max().item())
# bottom-right causal: q shorter than k
cuq = torch.tensor([0, 30, 60], device=dev, dtype=torch.int32); cuk = torch.tensor([0, 100, 256], device=dev, dtype=torch.int32)
o2, l2, *_ = f(q[:60], k, v, cuq, cuk, 30, 156, 0.0, True, False, scale=0.125)
ro2, rl2 = ref(q[:60], k, v, cuq.tolist(), cuk.tolist(), True)
print("bottom-right causal err", (o2.float() - ro2).abs().max().item())
# empty q segments, non-causal
cuq = torch.tensor([0, 0, 40, 40], device=dev, dtype=torch.int32); cuk = torch.tensor([0, 64, 128, 256], device=dev, dtype=torch.int32)
q1 = q[:40, :1].contiguous(); k1 = k[:, :1].contiguous(); v1 = v[:, :1].contiguous()
o3, l3, rng3, un3, _ = f(q1, k1, v1, cuq, cuk, 40, 128, 0.0, False, False, scale=0.125)
ro3, rl3 = ref(q1, k1, v1, cuq.tolist(), cuk.tolist(), False)
print("empty-seg fwd err", (o3.float() - ro3).abs().max().item(), (l3 - rl3).abs().max().item(), l3.shape)
do = torch.randn_like(o3)
for name, r, u in [("fwd rng", rng3, un3), ("empty", torch.empty(0, device=dev, dtype=torch.int64), torch.empty(0, device=dev, dtype=torch.int64))]:
    try:
        dq, dk, dv = b(do, q1, k1, v1, o3, l3, cuq, cuk, 40, 128, 0.0, False, r, u, scale=0.125)
        qq, kk, vv = (x.detach().float().requires_grad_() for x in (q1, k1, v1))
        rr, _ = ref(qq, kk, vv, cuq.tolist(), cuk.tolist(), False); rr.backward(do.float())
        print("bwd", name, (dq.float() - qq.grad).abs().max().item(), (dk.float() - kk.grad).abs().max().item(), (dv.float() - vv.grad).abs().max().item())
    except Exception as e:
        print("bwd", name, "failed", repr(e)[:300])
# GQA backward
try:
    do = torch.randn_like(out)
    dq, dk, dv = b(do, q, k, v, out, lse, cu, cu, 156, 156, 0.0, True, rng, unused, scale=0.125)
    qq, kk, vv = (x.detach().float().requires_grad_() for x in (q, k, v))
    rr, _ = ref(qq, kk, vv, cu.tolist(), cu.tolist(), True); rr.backward(do.float())
    print("bwd gqa", dk.shape, (dq.float() - qq.grad).abs().max().item(), (dk.float() - kk.grad).abs().max().item())
except Exception as e:
    print("bwd gqa failed", repr(e)[:300])
