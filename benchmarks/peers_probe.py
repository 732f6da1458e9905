"""Can the peers run here? Prints how Liger-Kernel and TileGym RMSNorm / SiLU·mul are called, or why not."""
import torch

x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
ref = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
try:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    y = LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False)
    print("liger rms_norm ok", flush=True) or print("liger rms_norm ok", (y.float() - ref.float()).abs().max().item())
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    print("liger silu_mul ok", LigerSiLUMulFunction.apply(x, x).shape)
except Exception:
    import traceback
    traceback.print_exc()
try:
    from tilegym.ops.cutile.rms_norm import rms_norm
    y = rms_norm(x, None, w, 1e-6)
    print("tilegym rms_norm ok", (y.float() - ref.float()).abs().max().item())
    from tilegym.ops.cutile.silu_and_mul import silu_and_mul
    print("tilegym silu_and_mul ok", silu_and_mul(torch.randn(16, 2 * 4096, device="cuda", dtype=torch.bfloat16)).shape)
except Exception:
    import traceback
    traceback.print_exc()
