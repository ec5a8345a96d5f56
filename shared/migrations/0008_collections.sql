-- 0008: the downloads: regional collections of every entry's latest good data, and the
-- coverage maps (services/scheduler/collect.py, coverage.py).

-- One row per zip built. The current zip of a name is its newest row; older rows stay until
-- their files are removed (deleted_at), so a download that began before a rebuild finishes.
CREATE TABLE collections (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The file name: openaddr-collected-{region}[-{layer}][-sa].zip
    name          text NOT NULL,
    region        text NOT NULL,
    layer         text NOT NULL
                  CHECK (layer IN ('addresses', 'parcels', 'buildings', 'centerlines')),
    share_alike   boolean NOT NULL,
    storage_key   text NOT NULL UNIQUE,
    size_bytes    bigint NOT NULL,
    -- Addresses (or features of the other layers) in the zip.
    feature_count bigint NOT NULL,
    source_count  integer NOT NULL,
    run_ids       bigint[] NOT NULL,
    -- The sources repository commit the newest included run was made from.
    sources_sha   text,
    built_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);
CREATE INDEX collections_name_idx ON collections (name, built_at DESC);

-- The coverage maps drawn after a set finished: one row per drawing, the newest current.
CREATE TABLE coverage_maps (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The finished set that made them due (null: drawn by hand).
    set_id      bigint UNIQUE REFERENCES sets (id) ON DELETE SET NULL,
    -- File name (world.png, us.png, europe.png, coverage.geojson) → storage key.
    files       jsonb NOT NULL,
    -- Areas by kind: good, failed, none.
    counts      jsonb NOT NULL,
    drawn_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX coverage_maps_drawn_at_idx ON coverage_maps (drawn_at DESC);
