// Policy <-> JSON, for the bookkeeping stored beside each generation. The
// JSON mirrors the model one to one; it is not a user-facing format.
#pragma once

#include <bulkhead/policy.hpp>

#include <nlohmann/json.hpp>

namespace bulkhead::detail {

nlohmann::json policy_to_json(const Policy& policy);
Policy policy_from_json(const nlohmann::json& j);

}  // namespace bulkhead::detail
