"""Adapter for Ultralytics' data side: check_det_dataset, YOLODataset and its loaders, sharded over ranks; and the
synthetic shapes set."""

from yolods.data.loaders import TrainData, build_train_data, build_val_loader, load_data_yaml, preprocess_batch

__all__ = ["TrainData", "build_train_data", "build_val_loader", "load_data_yaml", "preprocess_batch"]
