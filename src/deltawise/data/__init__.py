"""Data in: the one reader of text, JSONL and `datasets` data (``read``) and its batching for models (``tasks``)."""

from deltawise.data.read import DataFile, Item, load_items, read_data, split_documents

__all__ = ["DataFile", "Item", "load_items", "read_data", "split_documents"]
