"""Search: find the fastest model inside the error budget by measuring candidate pipelines on the target
(`optimize --auto`), with trials in Optuna's storage so that workers on several machines share one search."""

from onnxforge.search.run import SearchResult, search, search_worker
from onnxforge.search.study import SearchError

__all__ = ["SearchError", "SearchResult", "search", "search_worker"]
