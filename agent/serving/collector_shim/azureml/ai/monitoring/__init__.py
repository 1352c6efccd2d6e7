"""Azure ML's data-collection SDK v2 (``pip install azureml-ai-monitoring``), as the edge agent
provides it to scoring scripts without any Azure package: ``from azureml.ai.monitoring import
Collector``. See ``collector.py`` and docs/monitoring.md."""

from .collector import Collector
from .context import BasicCorrelationContext, CorrelationContext

__all__ = ["BasicCorrelationContext", "Collector", "CorrelationContext"]
