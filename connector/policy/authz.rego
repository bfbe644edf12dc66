# The connector's decision library. The same Rego runs in-process (regopy) and in an OPA
# server. data.usage_policies holds the verified, normalised usage policies (items) and an
# index member -> dataset -> positions in items; input is the request:
#   {member, purpose, datasets: [name], columns: {dataset: [column]}, time_ns}
# Default deny. Reasons never describe a policy that does not name the requesting member.
package connector.authz

import rego.v1

# Work is done once per query over policy indices, never per (dataset, column) pair, and sets
# hold indices rather than whole policy objects: regopy recomputes function calls and compares
# objects deeply, which made a decision over 200 policies take seconds.
policies := data.usage_policies.items

requested := {d | some d in input.datasets}

# Only policies that name the requesting member may shape a decision or a reason. The index
# is computed once per load in Python, so a decision reads only the requester's policies;
# each policy's members and datasets are still checked here.
my_index := object.get(data.usage_policies.index, input.member, {})

named_for(d) := {i |
	some i in object.get(my_index, d, [])
	input.member in policies[i].members
	d in policies[i].datasets
}

current(p) if {
	p.valid_from_ns <= input.time_ns
	input.time_ns < p.valid_until_ns
}

# Per requested dataset: the member's policies for it (any date, any purpose), those of them
# in date, those naming the purpose, and those that apply (purpose and date).
named := {d: named_for(d) | some d in requested}

in_date := {d: {i | some i in named[d]; current(policies[i])} | some d in requested}

for_purpose := {d: {i | some i in named[d]; input.purpose in policies[i].purposes} | some d in requested}

applicable := {d: ps | some d in requested; ps := in_date[d] & for_purpose[d]}

granted_columns := {d: {c | some i in applicable[d]; some c in policies[i].columns} | some d in requested}

# How each applicable policy shapes a dataset (masks, row filters, aggregate-only), as a
# canonical text. Policies that apply together must shape it alike: a union of different
# shapes could show in the clear what one of them masks or filters out.
shapings := {d: {policies[i].shaping | some i in applicable[d]} | some d in requested}

# Reasons are objects; the connector words them. (Formatting strings that come from data
# inside Rego is avoided on purpose: regopy 1.5 quotes them twice.)
reasons contains {"code": "no_dataset"} if count(input.datasets) == 0

reasons contains {"code": "not_granted", "dataset": d} if {
	some d in requested
	count(named[d]) == 0
}

# Granted to the member, but not for this purpose: "allowed" lists the purposes of the
# member's policies in date (empty when none is in date and none names this purpose).
reasons contains {"code": "purpose", "dataset": d, "purpose": input.purpose, "allowed": sort(allowed)} if {
	some d in requested
	count(named[d]) > 0
	count(applicable[d]) == 0
	allowed := {x | some i in in_date[d]; some x in policies[i].purposes}
	not input.purpose in allowed
	purpose_is_the_reason(d)
}

purpose_is_the_reason(d) if count(in_date[d]) > 0

purpose_is_the_reason(d) if count(for_purpose[d]) == 0

reasons contains {"code": "expired", "dataset": d, "policy": p.id, "until": p.valid_until} if {
	some d in requested
	count(applicable[d]) == 0
	some i in for_purpose[d]
	p := policies[i]
	input.time_ns >= p.valid_until_ns
}

reasons contains {"code": "not_yet_valid", "dataset": d, "policy": p.id, "from": p.valid_from} if {
	some d in requested
	count(applicable[d]) == 0
	some i in for_purpose[d]
	p := policies[i]
	input.time_ns < p.valid_from_ns
}

reasons contains {"code": "column", "dataset": d, "column": c} if {
	some d in requested
	count(applicable[d]) > 0
	some c in object.get(input.columns, d, [])
	not c in granted_columns[d]
}

reasons contains {"code": "shaping", "dataset": d, "policies": ids} if {
	some d in requested
	count(shapings[d]) > 1
	ids := sort({policies[i].id | some i in applicable[d]})
}

grants contains grant if {
	some d in requested
	count(applicable[d]) > 0
	grant := {
		"dataset": d,
		"columns": sort(granted_columns[d]),
		"policies": sort([[p.id, p.version] | some i in applicable[d]; p := policies[i]]),
	}
}

# Obligations of every policy the answer rests on: the shortest deletion deadline, and all
# attributions and terms. They travel to the peer in the receipt and the Arrow schema.
used := {i | some d in requested; some i in applicable[d]}

delete_days := [n | some i in used; n := policies[i].delete_within_days; n > 0]

default deadline := {}

deadline := {"delete_within_days": min(delete_days)} if count(delete_days) > 0

obligations := object.union(
	{
		"attribution": sort({a | some i in used; a := policies[i].attribution; a != ""}),
		"terms": sort({t | some i in used; some t in policies[i].terms}),
	},
	deadline,
)

default allow := false

# Every dataset the query reads needs a grant, whatever the reasons say.
allow if {
	count(input.datasets) > 0
	count(reasons) == 0
	every d in requested {
		count(applicable[d]) > 0
	}
}

# Every answer echoes the revision of the policies it was computed from, so the connector
# can tell an answer from its own policies from one computed from anything else.
decision := {
	"allow": allow,
	"reasons": [r | some r in reasons],
	"grants": [g | some g in grants; allow],
	"obligations": obligations,
	"revision": data.usage_policies.revision,
}

# For GetCatalog: input {member, time_ns}. What is granted to the member now, any purpose.
catalog := {"revision": data.usage_policies.revision, "entries": catalog_entries}

catalog_entries := [entry |
	my_index[d]
	ps := [p | some i in named_for(d); p := policies[i]; current(p)]
	count(ps) > 0
	entry := {
		"dataset": d,
		"columns": sort({c | some p in ps; some c in p.columns}),
		"purposes": sort({x | some p in ps; some x in p.purposes}),
		"policies": sort([[p.id, p.version] | some p in ps]),
		"valid_from_ns": min([p.valid_from_ns | some p in ps]),
		"valid_until_ns": max([p.valid_until_ns | some p in ps]),
	}
]
