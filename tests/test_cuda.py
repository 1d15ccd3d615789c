"""CUDA paths agree with the CPU ones. Skipped where no GPU is present (CI); run on a GPU machine."""
import numpy as np
import pytest
import torch

from kernels.models import build_model
from kernels.train import Recipe, predict_stacked, train_stacked
from kernels.projectors import make_projector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_batched_training_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (256,), generator=g)
    x = torch.randn(256, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1)
    make = lambda: build_model("small_cnn", (1, 8, 8), 3, 8)  # noqa: E731
    subsets = [np.arange(0, 256, 2), np.arange(1, 256, 2)]
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05, amp=False)   # float32 both sides: compared to rounding
    cpu = train_stacked(make, x, y, subsets, [1, 2], recipe)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False   # float32 on the GPU too
    try:
        gpu = train_stacked(make, x.cuda(), y.cuda(), subsets, [1, 2], recipe)
        predicted = predict_stacked(make, gpu, x.cuda()).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(predicted, predict_stacked(make, cpu, x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["dense", "factored"])
def test_projected_gradients_on_cuda_follow_the_same_plan(kind):
    """The dense matrix is generated on the device (CUDA's generator: other entries than the CPU's),
    so CPU and CUDA features agree in what they preserve, inner products, not entry by entry; the
    factored plan is the same on both and its exact identity with the reference is tested on CPU."""
    torch.manual_seed(0)
    model = build_model("resnet9", (3, 16, 16), 10, 8)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    x, y = torch.randn(40, 3, 16, 16), torch.randint(0, 10, (40,))
    gpu = make_projector(kind, model.cuda(), {k: v.cuda() for k, v in params.items()}, 1024, 3, 2e8, "cuda")(
        x.cuda(), y.cuda()).cpu().double()
    again = make_projector(kind, model.cuda(), {k: v.cuda() for k, v in params.items()}, 1024, 3, 2e8, "cuda")(
        x.cuda(), y.cuda()).cpu().double()
    torch.testing.assert_close(gpu, again)                       # deterministic on the device
    cpu = make_projector(kind, model.cpu(), params, 1024, 3, 2e8, "cpu")(x, y).double()
    g_gpu, g_cpu = gpu @ gpu.T, cpu @ cpu.T
    assert torch.corrcoef(torch.stack([g_gpu.flatten(), g_cpu.flatten()]))[0, 1] > 0.9


def test_loader_to_cuda_pinned_and_resident(tmp_path):
    from kernels.dataloader import Loader
    from kernels.loader import write_loader_file
    from kernels.transforms import ChannelsLast, Cutout, Normalize, Pipeline, RandomHorizontalFlip, RandomTranslate

    images = np.random.default_rng(0).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    path = write_loader_file(tmp_path / "c.pvl", {"image": images, "label": np.arange(300)})
    pipe = Pipeline([RandomHorizontalFlip(), RandomTranslate(2), Cutout(4), Normalize((0.5,) * 3, (0.25,) * 3),
                     ChannelsLast()])
    kw = dict(order="random", seed=1, pipelines={"image": pipe})
    cpu = [b["image"].clone() for b in Loader(path, 64, **kw)]
    gpu = [b for b in Loader(path, 64, device="cuda", **kw)]
    res = [b for b in Loader(path, 64, device="cuda", resident=True, **kw)]
    assert all(g["image"].is_cuda and r["image"].is_cuda for g, r in zip(gpu, res))
    for c, g, r in zip(cpu, gpu, res):
        torch.testing.assert_close(g["image"].cpu(), c, rtol=0, atol=0)
        torch.testing.assert_close(r["image"].cpu(), c, rtol=0, atol=0)
