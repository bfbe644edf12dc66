"""The shapes of the names the connector accepts: member, data space, dataset, policy,
column, purpose and request ids. One definition each, used by every reader."""

from __future__ import annotations

import re

MEMBER_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DATASPACE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
# No leading "_": the store's own schemas use it.
DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
COLUMN_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
POLICY_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
PURPOSE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,127}$")
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
