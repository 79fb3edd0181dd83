"""Shared training core: data order, batching and loss helpers used by the SFT and DPO runs."""
