-- 0001: the registry as edge-deploy created it before its migrations were SQL files (schema
-- version 1, then kept in PRAGMA user_version only). Same tables, columns, keys and index names,
-- and on SQLite the same column affinities, so a file made by that code is this migration, applied.
--
-- Written to run unchanged on PostgreSQL. What differs there:
-- * DOUBLE PRECISION where the old file says REAL: SQLite gives both REAL affinity (the same
--   values), but on PostgreSQL REAL is 4 bytes, and a Unix time in it is off by up to a minute.
-- * BIGINT where the old file says INTEGER, for byte sizes and generations: generations are
--   milliseconds since 1970 (past 2**31); SQLite gives both INTEGER affinity.
-- * INTEGER PRIMARY KEY is, on SQLite only, an alias of the rowid (as in the old file). Nothing
--   relies on that: edge-deploy assigns ids itself (MAX(id) + 1 inside its write transaction), so
--   the same INSERTs work on PostgreSQL, where this is a plain integer key with no default.
-- * SQLite lets a TEXT primary key hold NULL and checks foreign keys only under
--   PRAGMA foreign_keys=ON (the registry sets it); PostgreSQL always refuses both. edge-deploy
--   writes neither.
-- * JSON documents are TEXT. The queries read them with SQLite's json_extract; on PostgreSQL
--   those queries, not this schema, would change (or the columns become JSONB in a migration).

CREATE TABLE models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT,
    artifact TEXT NOT NULL,
    inputs TEXT,
    outputs TEXT,
    tags TEXT,
    properties TEXT,
    created_at DOUBLE PRECISION
);
CREATE UNIQUE INDEX idx_models_name_version ON models (name, version);

CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT,
    artifact TEXT NOT NULL,
    has_score INTEGER,
    tags TEXT,
    properties TEXT,
    meta TEXT,
    created_at DOUBLE PRECISION
);
CREATE UNIQUE INDEX idx_images_name_version ON images (name, version);
CREATE INDEX idx_images_sha256 ON images (sha256);

CREATE TABLE image_models (
    image_id INTEGER REFERENCES images (id),
    model_id INTEGER REFERENCES models (id),
    alias TEXT,
    PRIMARY KEY (image_id, model_id)
);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    tags TEXT,
    online INTEGER,
    last_seen DOUBLE PRECISION,
    inventory TEXT,
    status TEXT,
    last_generation BIGINT,
    created_at DOUBLE PRECISION
);

CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    image_id INTEGER REFERENCES images (id),
    target TEXT,
    policy TEXT,
    sections TEXT,
    state TEXT,
    reason TEXT,
    command TEXT,
    wave INTEGER,
    phase TEXT,
    phase_since DOUBLE PRECISION,
    lease_owner TEXT,
    lease_until DOUBLE PRECISION,
    created_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION
);
CREATE INDEX idx_deployments_image_id ON deployments (image_id);

CREATE TABLE deployment_devices (
    deployment_id TEXT REFERENCES deployments (id),
    device_id TEXT,
    wave INTEGER,
    state TEXT,
    generation BIGINT,
    manifest_sha256 TEXT,
    previous TEXT,
    revert_generation BIGINT,
    published_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    error TEXT,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX idx_deployment_devices_device_id ON deployment_devices (device_id);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    deployment_id TEXT,
    ts DOUBLE PRECISION,
    kind TEXT,
    detail TEXT
);
CREATE INDEX idx_events_deployment_id_id ON events (deployment_id, id);

-- no key: rows are only appended, read by device and time, and deleted by age
CREATE TABLE heartbeats (
    device_id TEXT,
    ts DOUBLE PRECISION,
    model TEXT,
    version TEXT,
    requests INTEGER,
    errors INTEGER,
    p99_ms DOUBLE PRECISION
);
CREATE INDEX idx_heartbeats_device_id_ts ON heartbeats (device_id, ts);
