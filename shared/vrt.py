"""The OGR VRT beside each address CSV (in a run's processed.zip and in the collections): one
place for its text, so that both describe the CSV the same way."""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr


def vrt_text(csv_member: str) -> str:
    """An OGR VRT reading the sibling CSV as EPSG:4326 points from LON/LAT."""
    csv_file = csv_member.rsplit("/", 1)[-1]
    layer = csv_file.removesuffix(".csv")
    return (
        "<OGRVRTDataSource>\n"
        f"  <OGRVRTLayer name={quoteattr(layer)}>\n"
        f'    <SrcDataSource relativeToVRT="1">{escape(csv_file)}</SrcDataSource>\n'
        f"    <SrcLayer>{escape(layer)}</SrcLayer>\n"
        "    <GeometryType>wkbPoint</GeometryType>\n"
        "    <LayerSRS>EPSG:4326</LayerSRS>\n"
        '    <GeometryField encoding="PointFromColumns" x="LON" y="LAT"/>\n'
        "  </OGRVRTLayer>\n"
        "</OGRVRTDataSource>\n"
    )
