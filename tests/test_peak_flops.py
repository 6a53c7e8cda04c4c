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
