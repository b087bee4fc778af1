-- Dead letters keep any entry, whatever its bytes (issue 13).
--
-- `fields` stays the readable view (an object of field name -> text). An entry that view cannot
-- hold exactly (a NUL or bytes that are not UTF-8 in a field name, value or the stream name, a
-- field name given twice, or a cut) also gets `raw_entry`: its stream name and fields as
-- base64, in entry order, so `dead-letters retry` replays the exact bytes. `raw_entry IS NOT
-- NULL` is the flag: then `fields` is escaped (see docs/queue.md#dead-letter-format).
-- `truncated_bytes` counts the bytes cut to keep one dead letter bounded (0: complete).
ALTER TABLE public.dead_letters
    ADD COLUMN IF NOT EXISTS raw_entry jsonb,
    ADD COLUMN IF NOT EXISTS truncated_bytes bigint NOT NULL DEFAULT 0;
