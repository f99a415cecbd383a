// Run once by the mongo image (/docker-entrypoint-initdb.d) when it initialises an empty data
// volume, already authenticated as the root user: creates the vault's own user, zandd-vault,
// with readWrite on the zandd database and nothing else (no admin, no other database). The
// workers connect as this user (ZANDD_VAULT_URL in compose.yaml); root stays for operators.
// The password comes from MONGO_VAULT_PASSWORD (compose/.env); there is no default.
const password = process.env.MONGO_VAULT_PASSWORD;
if (!password) {
  throw new Error("MONGO_VAULT_PASSWORD is not set: refusing to create the vault user");
}
db.getSiblingDB("zandd").createUser({
  user: "zandd-vault",
  pwd: password,
  roles: [{ role: "readWrite", db: "zandd" }],
});
