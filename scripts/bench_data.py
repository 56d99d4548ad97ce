"""What the benchmarks publish: one realistic air-quality payload (FIWARE
AirQualityObserved), varied per record by the caller."""

from __future__ import annotations

from typing import Any

PAYLOAD: dict[str, Any] = {
    "dateObserved": "2026-11-28T07:00:00+07:00",
    "location": {"type": "Point", "coordinates": [106.8230, -6.1950]},
    "name": "DKI1 Bundaran HI",
    "pm25": 35.5,
    "pm10": 52.0,
    "no2": {"value": 21.3, "unitCode": "GQ"},
}
