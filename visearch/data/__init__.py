"""Datasets in the revisitop layout: the model and loading (dataset.py), the gnd file (revisitop.py), conversion from
folders (convert.py) and ground-truth files (ground_truth.py)."""
from .convert import ConvertReport, SkippedFile, convert, make_id
from .dataset import Dataset, Source, list_datasets, load_dataset
from .revisitop import is_revisitop_folder, read_gnd, validate_gnd, write_gnd

__all__ = ["ConvertReport", "Dataset", "SkippedFile", "Source", "convert", "is_revisitop_folder", "list_datasets",
           "load_dataset", "make_id", "read_gnd", "validate_gnd", "write_gnd"]
