"""``azureml.ai.monitoring.Collector`` on the edge (the API of Microsoft's azureml-ai-monitoring).

    inputs_collector = Collector(name="model_inputs", on_error=lambda e: logging.info("ex:%s", e))
    context = inputs_collector.collect(input_df)          # a DataFrame, list, dict or numpy array
    outputs_collector.collect(output_df, context)         # correlated with those inputs

``collect()`` turns the data into JSON at once (so a failure is reported where it happens) and hands
it to the agent with the request's answer; the agent writes it to the user's blob storage as Azure
ML does, under ``modelDataCollector/{endpoint}/{deployment}/{name}/...``. Only collections the
deployment enables (``data_collection.collections`` in the manifest) are kept, each sampled at its
rate. A failure raises, as on Azure ML, unless ``on_error`` is given: then ``on_error`` gets the
exception and the request goes on; an exception raised by ``on_error`` itself is written to the
worker's log and goes no further, so collection can never fail a request that asked to be spared.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ... import _edge_collect as _bridge
from .context import CorrelationContext, get_context


class Collector:
    def __init__(self, *, name: str, on_error: Callable[[Exception], Any] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("Collector needs a name, e.g. Collector(name='model_inputs')")
        self.name = name
        self.on_error = on_error

    def collect(
        self,
        data: Any,
        correlation_context: CorrelationContext | None = None,
        *,
        context: CorrelationContext | None = None,
    ) -> CorrelationContext:
        """Collect ``data``; returns the correlation context to pass to the next collector.

        ``context=`` is accepted as another name for ``correlation_context``."""
        ctx = correlation_context or context or get_context()
        try:
            rate = _bridge.rate(self.name)
            if rate is None:
                return ctx  # the deployment does not collect this: nothing to serialise
            corr = str(ctx.get_id())
            # The request's own context before the worker knows the request's id: the agent samples
            # (and names the correlation) on that id, as it does the request and response payloads.
            pending = _bridge.is_pending(ctx)
            if not pending and not _bridge.sampled(rate, corr):
                return ctx
            record = {
                "kind": "v2",
                "collection": self.name,
                "id": _bridge.new_id(),
                "time": _bridge.now(),
                "data": _bridge.to_json(data),
                "collectdatatype": _bridge.type_name(data),
                "correlationid": corr,
            }
            if pending:
                record["pending_id"] = True
            _bridge.emit(record)
        except Exception as exc:
            if self.on_error is None:
                raise
            try:
                self.on_error(exc)
            except Exception as again:  # the handler failed too: the request must still be answered
                print(
                    f"azureml.ai.monitoring: collector {self.name!r}: on_error raised "
                    f"{type(again).__name__}: {again} (while handling {type(exc).__name__}: {exc})",
                    file=sys.stderr,
                )
        return ctx
