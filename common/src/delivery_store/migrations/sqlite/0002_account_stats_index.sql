-- GetDeliveryStats of an account: the columns the stats read, after the account and time
-- range, so SQLite answers from this index alone (a covering index) instead of the table.
CREATE INDEX pushwire_deliveries_account_stats
    ON pushwire_deliveries (account, create_ms, campaign_id, state, skip_reason);
