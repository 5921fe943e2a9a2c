"""Shared test fixtures: the devices present, deterministic generators."""

import pytest
import torch

import llmkit


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available() and llmkit.build_info()["cuda"]:
        devices.append("cuda")
    return devices


DEVICES = available_devices()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_report_header(config):
    return f"llmkit build: {llmkit.build_info()}"
