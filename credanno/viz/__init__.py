"""Pictures of stored features: t-SNE maps (Fig. 3) and the paper's figures."""

from credanno.viz.figures import (
    FIG3_LABELS,
    annotation_reduction_figure,
    color_names,
    label_colours,
    legend_entries,
    n_correct_figure,
    save_figure,
    tsne_figure,
)
from credanno.viz.source import DataSource, describe_source
from credanno.viz.tsne import TSNEMap, resolve_store, tsne_map

__all__ = [
    "FIG3_LABELS", "DataSource", "TSNEMap", "annotation_reduction_figure", "color_names",
    "describe_source", "label_colours", "legend_entries", "n_correct_figure", "resolve_store",
    "save_figure", "tsne_figure", "tsne_map",
]
