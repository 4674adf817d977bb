"""Which kernel takes CPU fp32 products (`kernels.fp32_onednn`: oneDNN by default on every CPU; with
`set_fp32_products("vendor")` MKL on Intel CPUs, where it was the faster), and that either gives
`F.linear`'s results and gradients to rounding."""

import pytest
import torch
import torch.nn.functional as F

from lm_human_preferences.language import kernels


@pytest.fixture
def vendor(monkeypatch):
    """Set the CPU vendor `fp32_onednn` sees (and, optionally, the products' choice); the choice
    and the cached answer are restored after."""
    before = kernels.set_fp32_products("onednn")

    def set_vendor(name, choice="onednn"):
        monkeypatch.setattr(kernels, "cpu_vendor", lambda: name)
        kernels.set_fp32_products(choice)
    yield set_vendor
    kernels.set_fp32_products(before)


@pytest.mark.parametrize("name, choice, onednn", [("GenuineIntel", "vendor", False), ("AuthenticAMD", "vendor", True),
                                                  ("", "vendor", True), ("GenuineIntel", "onednn", True),
                                                  ("AuthenticAMD", "onednn", True)])
def test_fp32_products_take_onednn_unless_vendor_chooses_mkl_on_intel(vendor, monkeypatch, name, choice, onednn):
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    vendor(name, choice)
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
    vendor(name, "vendor")
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


def test_an_unknown_choice_is_refused_and_a_run_option_checks_it():
    with pytest.raises(ValueError, match="expected one of onednn, vendor"):
        kernels.set_fp32_products("mkl")
    from lm_human_preferences.hparams import HParamsError
    from lm_human_preferences.runtime import RunHParams
    with pytest.raises(HParamsError, match="fp32_products"):
        RunHParams(fp32_products="mkl").validate()
