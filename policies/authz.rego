# The connector's decision library. The same Rego runs in-process (regopy) and in an OPA
# server. data.usage_policies.items holds the verified, normalised usage policies; input is the request:
#   {member, purpose, datasets: [name], columns: {dataset: [column]}, time_ns}
# Default deny. Reasons never describe a policy that does not name the requesting member.
package connector.authz

import rego.v1

# Policies that name the requesting member; nothing else may shape a reason.
mine contains p if {
	some p in data.usage_policies.items
	input.member in p.members
}

current(p) if {
	p.valid_from_ns <= input.time_ns
	input.time_ns < p.valid_until_ns
}

applicable(d) := {p |
	some p in mine
	d in p.datasets
	input.purpose in p.purposes
	current(p)
}

named_for(d) := {p | some p in mine; d in p.datasets}

# Reasons are objects; the connector words them. (Formatting strings that come from data
# inside Rego is avoided on purpose: regopy 1.5 quotes them twice.)
reasons contains {"code": "no_dataset"} if count(input.datasets) == 0

reasons contains {"code": "not_granted", "dataset": d} if {
	some d in input.datasets
	count(named_for(d)) == 0
}

# Granted for some purpose, but not this one (among the policies in date).
reasons contains {"code": "purpose", "dataset": d, "purpose": input.purpose, "allowed": sort(allowed)} if {
	some d in input.datasets
	count(applicable(d)) == 0
	in_date := {p | some p in named_for(d); current(p)}
	count(in_date) > 0
	not input.purpose in {x | some p in in_date; some x in p.purposes}
	allowed := {x | some p in in_date; some x in p.purposes}
}

reasons contains {"code": "expired", "dataset": d, "policy": p.id, "until": p.valid_until} if {
	some d in input.datasets
	count(applicable(d)) == 0
	some p in named_for(d)
	input.purpose in p.purposes
	input.time_ns >= p.valid_until_ns
}

reasons contains {"code": "not_yet_valid", "dataset": d, "policy": p.id, "from": p.valid_from} if {
	some d in input.datasets
	count(applicable(d)) == 0
	some p in named_for(d)
	input.purpose in p.purposes
	input.time_ns < p.valid_from_ns
}

granted_columns(d) := {c | some p in applicable(d); some c in p.columns}

reasons contains {"code": "column", "dataset": d, "column": c} if {
	some d in input.datasets
	count(applicable(d)) > 0
	some c in object.get(input.columns, d, [])
	not c in granted_columns(d)
}

grants contains grant if {
	some d in input.datasets
	count(applicable(d)) > 0
	grant := {
		"dataset": d,
		"columns": sort(granted_columns(d)),
		"policies": sort([[p.id, p.version] | some p in applicable(d)]),
	}
}

# Obligations of every policy the answer rests on: the shortest deletion deadline, and all
# attributions and terms. They travel to the peer in the receipt and the Arrow schema.
used := {p | some d in input.datasets; some p in applicable(d)}

delete_days := [n | some p in used; n := p.delete_within_days; n > 0]

default deadline := {}

deadline := {"delete_within_days": min(delete_days)} if count(delete_days) > 0

obligations := object.union(
	{
		"attribution": sort({a | some p in used; a := p.attribution; a != ""}),
		"terms": sort({t | some p in used; some t in p.terms}),
	},
	deadline,
)

default allow := false

allow if {
	count(input.datasets) > 0
	count(reasons) == 0
}

decision := {
	"allow": allow,
	"reasons": [r | some r in reasons],
	"grants": [g | some g in grants; allow],
	"obligations": obligations,
}

# For GetCatalog: input {member, time_ns}. What is granted to the member now, any purpose.
catalog_datasets := {d | some p in mine; current(p); some d in p.datasets}

catalog := [entry |
	some d in catalog_datasets
	ps := [p | some p in mine; current(p); d in p.datasets]
	entry := {
		"dataset": d,
		"columns": sort({c | some p in ps; some c in p.columns}),
		"purposes": sort({x | some p in ps; some x in p.purposes}),
		"policies": sort([[p.id, p.version] | some p in ps]),
		"valid_from_ns": min([p.valid_from_ns | some p in ps]),
		"valid_until_ns": max([p.valid_until_ns | some p in ps]),
	}
]
