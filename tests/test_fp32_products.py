"""Which kernel takes CPU fp32 products (`kernels.fp32_onednn`: oneDNN except on Intel CPUs, where
MKL was the faster), and that either gives `F.linear`'s results and gradients to rounding."""

import pytest
import torch
import torch.nn.functional as F

from lm_human_preferences.language import kernels


@pytest.fixture
def vendor(monkeypatch):
    """Set the CPU vendor `fp32_onednn` sees; its cached answer is cleared before and after."""
    def set_vendor(name):
        monkeypatch.setattr(kernels, "cpu_vendor", lambda: name)
        kernels.fp32_onednn.cache_clear()
    yield set_vendor
    kernels.fp32_onednn.cache_clear()


@pytest.mark.parametrize("name, onednn", [("GenuineIntel", False), ("AuthenticAMD", True), ("", True)])
def test_fp32_products_take_mkl_on_intel_cpus_and_onednn_elsewhere(vendor, monkeypatch, name, onednn):
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    vendor(name)
    calls = []
    apply = kernels._OneDNNLinear.apply
    monkeypatch.setattr(kernels._OneDNNLinear, "apply", lambda *a: calls.append("onednn") or apply(*a))
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    torch.testing.assert_close(kernels.fp32_linear(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert kernels.fp32_onednn() is onednn and calls == (["onednn"] if onednn else [])


def test_cpu_vendor_reads_cpuinfo():
    assert isinstance(kernels.cpu_vendor(), str)


@pytest.mark.parametrize("name", ["GenuineIntel", "AuthenticAMD"])
def test_either_kernel_gives_the_layers_results_and_gradients(vendor, name):
    vendor(name)
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(300, 24, requires_grad=True)
    dy = torch.randn(300, 40)
    got, want = [], []
    for fn, out in ((lambda: kernels.linear(layer, x), got), (lambda: layer(x), want)):
        x.grad = layer.weight.grad = layer.bias.grad = None
        y = fn()
        (y * dy).sum().backward()
        out += [y.detach(), x.grad, layer.weight.grad, layer.bias.grad]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    other = torch.randn(300, 40)
    torch.testing.assert_close(kernels.fp32_linear_add(x.detach(), layer.weight.detach(), other.clone()),
                               torch.addmm(other, x.detach(), layer.weight.detach().t()), rtol=1e-5, atol=1e-5)
