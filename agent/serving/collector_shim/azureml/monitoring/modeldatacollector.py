"""``azureml.monitoring.ModelDataCollector`` on the edge (the API of Microsoft's azureml-monitoring).

    inputs_dc = ModelDataCollector("best_model", designation="inputs", feature_names=["f1", "f2"])
    prediction_dc = ModelDataCollector("best_model", designation="predictions", feature_names=["p"])
    correlations = inputs_dc.collect(data)             # a list (one row), numpy array or DataFrame
    prediction_dc.collect(prediction_dc.add_correlations(result, correlations))

Rows go to CSV files in the user's blob storage, under the documented legacy path
``modeldata/{subscription}/{resourcegroup}/{workspace}/{webservice}/{model}/{version}/{designation}/
{yyyy}/{MM}/{dd}/data.csv``, with ``feature_names`` (or a DataFrame's columns) as the header. As in
Azure ML, an ``inputs`` collector appends the correlation columns (``$aml_dc_correlation_id``,
``$aml_dc_scoring_timestamp``, ...) and returns them; ``add_correlations`` appends them to another
collector's data. Collection happens only when the deployment sets ``collect_model_data`` (Azure
ML's ``AksWebservice.deploy_configuration(collect_model_data=True)``); otherwise ``collect`` says so
once on the worker's log and returns None, as the original does.
"""

from __future__ import annotations

import copy
import csv
import datetime
import io
import sys
from typing import Any

from .. import _edge_collect as _bridge

DESIGNATIONS = ("inputs", "predictions", "labels", "signals", "general")


class ModelDataCollector:
    AML_DC_CORRELATION_HEADER = "$aml_dc_correlation_id"
    AML_DC_SCORING_TIMESTAMP_HEADER = "$aml_dc_scoring_timestamp"
    AML_DC_BOUNDARY_HEADER = "$aml_dc_boundary"
    AML_WORKSPACE_HEADER = "$aml_workspace"
    AML_SERVICE_NAME_HEADER = "$aml_service_name"
    AML_MODEL_NAME_HEADER = "$aml_model_name"
    AML_MODEL_VERSION_HEADER = "$aml_model_version"
    AML_REQUEST_ID_HEADER = "$aml_request_id"
    #: The columns correlations add, in Azure ML's order.
    CORRELATION_HEADERS = (
        AML_DC_CORRELATION_HEADER,
        AML_DC_SCORING_TIMESTAMP_HEADER,
        AML_DC_BOUNDARY_HEADER,
        AML_WORKSPACE_HEADER,
        AML_SERVICE_NAME_HEADER,
        AML_MODEL_NAME_HEADER,
        AML_MODEL_VERSION_HEADER,
        AML_REQUEST_ID_HEADER,
    )
    _said_disabled = False

    def __init__(
        self,
        model_name: str,
        designation: str = "default",
        feature_names: list[str] | None = None,
        workspace: str = "default/default/default",
        webservice_name: str = "default",
        model_version: str = "default",
        collection_name: str = "default",
    ) -> None:
        self.model_name = model_name
        self.model_version = _bridge.deployment_default("model_version", str(model_version))
        self.workspace = _bridge.deployment_default("workspace", workspace.lower())
        self.service_name = _bridge.deployment_default("webservice", webservice_name)
        self.collection_name = collection_name
        self._feature_names = copy.copy(feature_names)
        self._correlation_headers: list[str] = []
        self._enabled = _bridge.model_data_collector_enabled()
        if designation == "default":
            designation = "general"
        if designation not in DESIGNATIONS:
            supported = ", ".join(map(repr, DESIGNATIONS))
            print(f"Incorrect designation value. Supported values: 'default', {supported}", file=sys.stderr)
            self._enabled = False
        self._designation = designation
        if not self._enabled and not ModelDataCollector._said_disabled:
            ModelDataCollector._said_disabled = True
            print(
                "Data collection is not enabled: the deployment's data_collection.collect_model_data "
                "is not true (docs/monitoring.md)",
                file=sys.stderr,
            )
        if designation == "inputs":
            self._add_correlation_headers()

    @property
    def designation(self) -> str:
        return self._designation

    def collect(self, input_data: Any, user_correlation_id: str = "") -> dict[str, Any] | None:
        """Collect rows; for the ``inputs`` designation, returns the correlation columns and values."""
        if not self._enabled:
            return None
        correlation_data = None
        header_from_data: list[str] | None = None
        if self._designation == "inputs":
            correlation_data = self._generated_fields(user_correlation_id)
            input_data = self.add_correlations(input_data, correlation_data)
        if isinstance(input_data, list):
            rows = [input_data]
        elif _bridge.is_ndarray(input_data):
            rows = input_data.tolist() if input_data.ndim > 1 else [input_data.tolist()]
        elif _bridge.is_dataframe(input_data):
            header_from_data = [str(c) for c in input_data.columns]
            text = input_data.to_csv(index=False, header=False)
            rows = [list(r) for r in csv.reader(io.StringIO(text))]
        else:
            print(
                "collect failed: input data must be list, numpy array or pandas dataframe",
                file=sys.stderr,
            )
            return None
        _bridge.emit(
            {
                "kind": "csv",
                "model": self.model_name,
                "version": self.model_version,
                "designation": self._designation,
                "workspace": self.workspace,
                "webservice": self.service_name,
                "collection_name": self.collection_name,
                "header": header_from_data or self._headers(),
                "rows": [[_cell(c) for c in row] for row in rows],
                "time": _bridge.now(),
            }
        )
        return correlation_data

    def add_correlations(self, input_data: Any, correlations: dict[str, Any] | None) -> Any:
        """``input_data`` with the correlation values appended (a column each)."""
        if correlations is None:
            return input_data
        self._add_correlation_headers()
        values = [correlations[h] for h in self.CORRELATION_HEADERS]
        if isinstance(input_data, list):
            return input_data + values
        if _bridge.is_ndarray(input_data):
            np = sys.modules["numpy"]
            arr = input_data if input_data.ndim > 1 else np.array([input_data])
            extra = np.repeat(np.array([values], dtype=object), arr.shape[0], axis=0)
            return np.append(arr.astype(object), extra, axis=1)
        if _bridge.is_dataframe(input_data):
            df = input_data.copy(deep=False)
            for header, value in zip(self.CORRELATION_HEADERS, values, strict=True):
                df.insert(len(df.columns), header, value)
            return df
        print("add_correlations: input data must be list, numpy array or pandas dataframe", file=sys.stderr)
        return input_data

    def _headers(self) -> list[str] | None:
        if self._feature_names is None:
            return None
        return [str(f) for f in self._feature_names] + self._correlation_headers

    def _add_correlation_headers(self) -> None:
        if not self._correlation_headers:
            self._correlation_headers = list(self.CORRELATION_HEADERS)

    def _generated_fields(self, correlation_id: str = "") -> dict[str, Any]:
        correlation = _bridge.new_id()
        generated = f"{correlation_id}-{correlation}" if correlation_id else correlation
        return {
            self.AML_DC_SCORING_TIMESTAMP_HEADER: datetime.datetime.now(datetime.UTC)
            .replace(tzinfo=None)
            .isoformat(),
            self.AML_REQUEST_ID_HEADER: _bridge.request_header("x-request-id") or _bridge.NO_REQUEST_ID,
            self.AML_DC_CORRELATION_HEADER: generated,
            self.AML_DC_BOUNDARY_HEADER: 60 * 24,  # the day: the file is per day
            self.AML_WORKSPACE_HEADER: self.workspace,
            self.AML_SERVICE_NAME_HEADER: self.service_name,
            self.AML_MODEL_NAME_HEADER: self.model_name,
            self.AML_MODEL_VERSION_HEADER: self.model_version,
        }


def _cell(value: Any) -> Any:
    """A CSV cell the frame can carry as JSON: numpy scalars become Python ones, the rest text."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return str(value)
