"""Region annotations as labs have them, one module per format, all read into one list of
Regions (class name + polygon in level-0 pixels) that RegionRasterizer paints into label masks:
QuPath GeoJSON (geojson), ASAP XML (asap), Aperio ImageScope XML (aperio), label-mask images
(masks). formats.load_regions picks the reader by the file's content."""

from histosynth.data.annotations.formats import FORMATS, check_sheet_files, detect_format, load_regions
from histosynth.data.annotations.raster import RegionRasterizer, class_fractions
from histosynth.data.annotations.regions import AnnotationError, Region

__all__ = [
    "FORMATS",
    "AnnotationError",
    "Region",
    "RegionRasterizer",
    "check_sheet_files",
    "class_fractions",
    "detect_format",
    "load_regions",
]
