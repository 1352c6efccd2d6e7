"""Azure ML's legacy data-collection SDK (``pip install azureml-monitoring``), as the edge agent
provides it to scoring scripts without any Azure package: ``from azureml.monitoring import
ModelDataCollector``. See ``modeldatacollector.py`` and docs/monitoring.md."""

from .modeldatacollector import ModelDataCollector

__all__ = ["ModelDataCollector"]
