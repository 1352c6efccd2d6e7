"""The edge agent's stand-in for Azure ML's ``azureml.contrib.services`` (see ../../../README.md)."""
