"""Generated fraud-detection transactions for ``fastml demo``.

The label follows a known logistic model of the features, so a model can
learn it (AUC well above 0.5), and a drift can be injected from a given row on
(a shifted amount distribution and a merchant category never seen before).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MERCHANT_CATEGORIES = (
    "grocery",
    "fuel",
    "restaurant",
    "travel",
    "electronics",
    "online",
    "pharmacy",
)
COUNTRIES = ("US", "GB", "DE", "FR", "BR", "IN", "NG", "JP")
NEW_CATEGORY = "crypto_exchange"  # appears only after the injected drift

NUMERIC_FEATURES = (
    "amount",
    "hour",
    "account_age_days",
    "tx_last_24h",
    "distance_km",
    "device_trust",
    "card_present",
)
CATEGORICAL_FEATURES = ("merchant_category", "country")


@dataclass
class Transactions:
    """Columns of a generated transactions table (NumPy arrays)."""

    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["label"])

    def numeric_matrix(self) -> np.ndarray:
        """(rows, features) float32: numeric features, then one-hot categories."""
        parts = [self.columns[c].astype(np.float32)[:, None] for c in NUMERIC_FEATURES]
        mc = self.columns["merchant_category"]
        for cat in MERCHANT_CATEGORIES:
            parts.append((mc == cat).astype(np.float32)[:, None])
        co = self.columns["country"]
        for c in COUNTRIES:
            parts.append((co == c).astype(np.float32)[:, None])
        return np.concatenate(parts, axis=1)

    @staticmethod
    def feature_names() -> list[str]:
        return (
            list(NUMERIC_FEATURES)
            + [f"merchant_category={c}" for c in MERCHANT_CATEGORIES]
            + [f"country={c}" for c in COUNTRIES]
        )

    def to_arrow(self):  # -> pyarrow.Table
        import pyarrow as pa

        cols = {}
        for name, arr in self.columns.items():
            if name in CATEGORICAL_FEATURES:
                cols[name] = pa.array(arr.astype(str)).dictionary_encode()
            elif name == "timestamp":
                cols[name] = pa.array(arr, type=pa.timestamp("s"))
            else:
                cols[name] = pa.array(arr)
        return pa.table(cols)


def generate(rows: int, seed: int = 0, drift_from: int | None = None) -> Transactions:
    """Generate ``rows`` transactions; rows from ``drift_from`` on are drifted."""
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    rng = np.random.default_rng(seed)
    n = rows
    drifted = np.zeros(n, dtype=bool)
    if drift_from is not None:
        if not 0 <= drift_from <= n:
            raise ValueError(f"drift_from must be in [0, {n}], got {drift_from}")
        drifted[drift_from:] = True

    amount = rng.lognormal(mean=3.5, sigma=1.0, size=n)
    amount[drifted] *= 2.5  # the shifted feature
    hour = rng.integers(0, 24, size=n)
    account_age = rng.gamma(shape=2.0, scale=400.0, size=n)
    tx_24h = rng.poisson(3.0, size=n)
    distance = rng.lognormal(mean=2.0, sigma=1.2, size=n)
    trust = rng.beta(5.0, 2.0, size=n)
    card_present = (rng.random(n) < 0.6).astype(np.int8)
    mc_idx = rng.choice(
        len(MERCHANT_CATEGORIES), size=n, p=[0.25, 0.15, 0.2, 0.08, 0.07, 0.2, 0.05]
    )
    merchant = np.array(MERCHANT_CATEGORIES, dtype=object)[mc_idx]
    if drifted.any():
        new_cat = drifted & (rng.random(n) < 0.15)
        merchant[new_cat] = NEW_CATEGORY
    country = np.array(COUNTRIES, dtype=object)[
        rng.choice(len(COUNTRIES), size=n, p=[0.4, 0.1, 0.1, 0.1, 0.08, 0.1, 0.04, 0.08])
    ]
    start = np.datetime64("2026-01-01T00:00:00", "s")
    timestamp = start + np.sort(rng.integers(0, 30 * 24 * 3600, size=n)).astype("timedelta64[s]")

    risky_cat = np.isin(merchant, ["electronics", "online", "travel", NEW_CATEGORY])
    risky_country = np.isin(country, ["NG", "BR"])
    night = (hour < 6).astype(float)
    logit = (
        -5.2
        + 0.9 * (np.log(amount) - 3.5)
        - 0.8 * np.log1p(account_age / 100.0)
        + 0.25 * (tx_24h - 3)
        + 0.5 * (np.log(distance) - 2.0)
        - 3.0 * (trust - 0.7)
        - 0.8 * card_present
        + 1.0 * risky_cat
        + 0.9 * risky_country
        + 0.8 * night
        + 2.0
    )
    p = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < p).astype(np.int64)
    return Transactions(
        {
            "timestamp": timestamp,
            "amount": amount.astype(np.float32),
            "hour": hour.astype(np.int32),
            "account_age_days": account_age.astype(np.float32),
            "tx_last_24h": tx_24h.astype(np.int32),
            "distance_km": distance.astype(np.float32),
            "device_trust": trust.astype(np.float32),
            "card_present": card_present,
            "merchant_category": merchant,
            "country": country,
            "label": label,
        }
    )
