"""Config sections the finetune config shares with the stages that apply them (`data`, `evaluation`,
`promotion`); each default lives here once. The sections owned by models/ (`lora`, `training`, `turbo`)
stay there."""
