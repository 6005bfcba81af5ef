"""Data sets by name, the device-resident pipeline and the variable-batch sampler."""
from dynbatch.data.device_data import DeviceData, DeviceSplit
from dynbatch.data.sampler import DynamicBatchSampler, VariableBatchSampler
from dynbatch.data.sources import DATASET_NAMES, DataSource, balanced_subset, hold_out, load_dataset

__all__ = ["DATASET_NAMES", "DataSource", "DeviceData", "DeviceSplit", "DynamicBatchSampler", "VariableBatchSampler",
           "balanced_subset", "hold_out", "load_dataset"]
