"""Feast objects of fraud-detection-service, imported by `feast apply` and by `fraud_detection.feature_store.apply`.

Names come from `fraud_detection.feature_store`, fields and types from `fraud_detection.features` (the one
feature definition). Offline paths are relative to the data dir: `get_store()` resolves them there.
"""
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, FileSource, PushSource, ValueType

from fraud_detection.feature_store import (
    CUSTOMER_VIEW,
    FEATURE_SERVICE,
    MERCHANT_RISK_OFFLINE,
    MERCHANT_VIEW,
    PUSH_SOURCE,
    STATE_OFFLINE,
    TIMESTAMP,
    feast_fields,
)
from fraud_detection.features import FEATURES, RISK_SCHEMA, STATE_SCHEMA

customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING,
                  description="A card holder: keyed hash of identity fields (no PII).")
merchant = Entity(name="merchant", join_keys=["merchant"], value_type=ValueType.STRING,
                  description="A merchant, by name.")

customer_state_log = FileSource(
    name="customer_state_log", path=STATE_OFFLINE, timestamp_field=TIMESTAMP,
    description="Every customer state pushed (online and offline), one parquet part per push.")
customer_realtime_push = PushSource(name=PUSH_SOURCE, batch_source=customer_state_log)

customer_realtime = FeatureView(
    name=CUSTOMER_VIEW, entities=[customer], ttl=timedelta(0), source=customer_realtime_push, online=True,
    schema=feast_fields(STATE_SCHEMA, exclude=("customer_id",)),
    description="Customer state after their last transaction (fraud_detection.features.STATE_SCHEMA); "
                "datetimes as Int64 epoch microseconds.")

merchant_risk_daily = FileSource(
    name="merchant_risk_daily", path=MERCHANT_RISK_OFFLINE, timestamp_field=TIMESTAMP,
    description="merchant_risk_table(...) written by the batch pipeline; event time = the row's day, 00:00 UTC.")

merchant_risk = FeatureView(
    name=MERCHANT_VIEW, entities=[merchant], ttl=timedelta(0), source=merchant_risk_daily, online=True,
    schema=feast_fields(RISK_SCHEMA, exclude=("merchant", "day")),
    description="Merchant volume and smoothed fraud rate over 30 days ending a label delay before the day.")

fraud_model_v1 = FeatureService(
    name=FEATURE_SERVICE, features=[customer_realtime, merchant_risk],
    description="What models of feature-set v1 read: the model's columns are "
                "fraud_detection.features.request_features(tx, state, merchant_risk) of these views.",
    tags={"computed_by": "fraud_detection.features.request_features", "model_features": ",".join(FEATURES)})
