"""runtime.peak_flops_of_name: each GPU's dense bf16 peak from the name torch.cuda.get_device_name()
gives it, so MFU is never computed against a sibling's number ("L40" is not an "L4", "H200 NVL" is
not an H200 SXM, "GH200" is not found inside "H200")."""

import pytest

import runtime

# The names as torch.cuda.get_device_name() returns them, and each one's dense bf16 TFLOP/s from
# NVIDIA's datasheets (half the headline figures, which assume 2:4 sparsity).
DEVICE_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.4,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA H800": 989.4,
    "NVIDIA H800 PCIe": 756.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA GB200": 2500.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L4": 121.0,
    "NVIDIA L40": 181.05,
    "NVIDIA L40S": 362.05,
    "NVIDIA A10G": 70.0,
    "NVIDIA A10": 125.0,
    "NVIDIA GeForce RTX 4090": 165.2,
    "NVIDIA GeForce RTX 3090": 71.0,
    "NVIDIA RTX A6000": 154.8,
}


@pytest.mark.parametrize("name", list(DEVICE_PEAKS))
def test_each_device_name_gets_its_own_peak(name):
    assert runtime.peak_flops_of_name(name) == pytest.approx(DEVICE_PEAKS[name] * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA GeForce GTX 1080", "NVIDIA T4", "NVIDIA A1000", "NVIDIA L400", "", "cpu"])
def test_an_unlisted_name_gets_none_not_a_neighbour_s_number(name):
    assert runtime.peak_flops_of_name(name) is None


# fp16 runs (cards without bf16 units) are measured against their fp16 peak; bf16 there has none.
FP16_PEAKS = {
    "Tesla V100-SXM2-32GB": 125.0,
    "Tesla V100-PCIE-16GB": 112.0,
    "Tesla V100S-PCIE-32GB": 130.0,
    "Tesla T4": 65.0,
    "NVIDIA GeForce RTX 2080 Ti": 53.8,
    "NVIDIA TITAN RTX": 130.5,
    "AMD Instinct MI100": 184.6,
}


@pytest.mark.parametrize("name", list(FP16_PEAKS))
def test_cards_without_bf16_units_have_an_fp16_peak_and_no_bf16_one(name):
    assert runtime.peak_flops_of_name(name, "fp16") == pytest.approx(FP16_PEAKS[name] * 1e12)
    assert runtime.peak_flops_of_name(name, "bf16") is None


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA GeForce RTX 4080 SUPER", 104.5),  # not the RTX 4080's 97.5
        ("NVIDIA GeForce RTX 4070 Ti SUPER", 88.2),
        ("NVIDIA GeForce RTX 4070", 58.3),
        ("NVIDIA GeForce RTX 5090", 209.5),
        ("NVIDIA GeForce RTX 3090 Ti", 80.0),
        ("NVIDIA RTX 6000 Ada Generation", 364.2),
        ("NVIDIA RTX A5000", 111.1),
        ("AMD Instinct MI250X / MI250", 383.0),
        ("AMD Instinct MI300X", 1307.4),
        ("AMD Instinct MI210", 181.0),
    ],
)
def test_consumer_workstation_and_amd_cards(name, tflops):
    assert runtime.peak_flops_of_name(name, "bf16") == pytest.approx(tflops * 1e12)


def test_peak_tflops_fills_in_an_unlisted_card_and_fp32_has_no_peak():
    import torch

    assert runtime.peak_flops(torch.device("cpu"), "bf16", tflops=50.0) == 50e12  # --peak-tflops 50 wins
    assert runtime.peak_flops_of_name("NVIDIA H100 80GB HBM3", "fp32") is None
