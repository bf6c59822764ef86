-- A stream's horizon as committed at the moment of the call, not as the calling statement's
-- snapshot saw it. A claim (INSERT … ON CONFLICT DO NOTHING) of an entry whose ledger row a
-- concurrent prune is deleting waits for the prune, then inserts the row again: the prune's
-- new horizon, committed with the delete, is invisible to the claim's own snapshot, so the
-- claim alone would take the entry for new and run it a second time. The claim calls this
-- after its insert (`p_after` is what it inserted, passed only so that the call is evaluated
-- after the insert): a VOLATILE function takes a fresh snapshot for each query it runs.
-- The horizon is returned as text, `<ms>-<seq>` like an entry id (NULL when the stream has none).
CREATE FUNCTION ledger_horizon_now(p_source TEXT, p_stream TEXT, p_after TEXT[])
RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    horizon TEXT;
BEGIN
    SELECT through[1]::text || '-' || through[2]::text INTO horizon
      FROM ledger_horizons WHERE source = p_source AND stream = p_stream;
    RETURN horizon;
END
$$;
