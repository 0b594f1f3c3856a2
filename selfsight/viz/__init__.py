"""Pictures of a run (``pictures.py``) drawn with Pillow charts (``draw.py``); the HTML report
and the run comparison live in ``selfsight/report.py``."""
from selfsight.viz.pictures import (cls_attention, embed_2d, nearest_neighbours, pca_2d, read_metrics,
                                    write_pictures)

__all__ = ["cls_attention", "embed_2d", "nearest_neighbours", "pca_2d", "read_metrics", "write_pictures"]
