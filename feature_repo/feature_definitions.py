"""Feast objects of fraud-detection-service, imported by `feast apply` and by `fraud_detection.feature_store.apply`.

Names come from `fraud_detection.feature_store`, fields and types from `fraud_detection.features` (the one
feature definition). Offline paths are relative to the data dir: `get_store()` resolves them there.
"""
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, FileSource, PushSource, ValueType

from fraud_detection.feature_store import (
    CUSTOMER_VIEW,
    FEATURE_SERVICE,
    PUSH_SOURCE,
    RISK_OFFLINE,
    RISK_VIEWS,
    STATE_OFFLINE,
    TIMESTAMP,
    feast_fields,
    risk_fields,
)
from fraud_detection.features import FEATURES, RISK_WINDOWS, STATE_SCHEMA

customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING,
                  description="A card holder: keyed hash of identity fields (no PII).")
_RISK_ENTITY_DOC = {"merchant": "A merchant, by name.", "category": "A merchant category (core.CATEGORIES).",
                    "zip": "The card holder's home zip code, as a string."}

customer_state_log = FileSource(
    name="customer_state_log", path=STATE_OFFLINE, timestamp_field=TIMESTAMP,
    description="Every customer state pushed (online and offline), one parquet part per push.")
customer_realtime_push = PushSource(name=PUSH_SOURCE, batch_source=customer_state_log)

customer_realtime = FeatureView(
    name=CUSTOMER_VIEW, entities=[customer], ttl=timedelta(0), source=customer_realtime_push, online=True,
    schema=feast_fields(STATE_SCHEMA, exclude=("customer_id",)),
    description="Customer state after their last transaction (fraud_detection.features.STATE_SCHEMA); "
                "datetimes as Int64 epoch microseconds.")

risk_entities, risk_views = {}, {}
for _e, _view in RISK_VIEWS.items():  # one entity, daily source and batch view per label-risk entity of the spec
    risk_entities[_e] = Entity(name=_e, join_keys=[_e], value_type=ValueType.STRING, description=_RISK_ENTITY_DOC[_e])
    _src = FileSource(
        name=f"{_view}_daily", path=RISK_OFFLINE[_e], timestamp_field=TIMESTAMP,
        description=f"{_e} rows of merchant_risk_table(...) written by the batch pipeline; event time = the row's "
                    "day, 00:00 UTC.")
    risk_views[_e] = FeatureView(
        name=_view, entities=[risk_entities[_e]], ttl=timedelta(0), source=_src, online=True,
        schema=feast_fields(risk_fields(_e)),
        description=f"{_e.capitalize()} volume and smoothed fraud rate over {', '.join(RISK_WINDOWS)}, each window "
                    "ending a label delay before the day.")
merchant, category, zip_code = risk_entities["merchant"], risk_entities["category"], risk_entities["zip"]
merchant_risk, category_risk, zip_risk = risk_views["merchant"], risk_views["category"], risk_views["zip"]

fraud_model_v1 = FeatureService(
    name=FEATURE_SERVICE, features=[customer_realtime, *risk_views.values()],
    description="What models of feature-set v1 read: the model's columns are "
                "fraud_detection.features.request_features(tx, state, risk rows) of these views.",
    tags={"computed_by": "fraud_detection.features.request_features", "model_features": ",".join(FEATURES)})
