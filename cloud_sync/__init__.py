"""cloud_sync."""
