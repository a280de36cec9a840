{{/* Rules between values that values.schema.json (generated from the app's pydantic
     models, field by field) cannot state. Each mirrors a check the app makes at load
     (deployments/config/tiered.py, models.py) and fails `helm lint`/`helm template`
     with the field named, instead of a RayService whose app never deploys. */}}
{{- define "tiered.checks" -}}
{{- $models := dict }}
{{- range $i, $m := .Values.tiered.models }}
{{- if hasKey $models $m.name }}
{{- fail (printf "tiered.models[%d].name: duplicate model %q" $i $m.name) }}
{{- end }}
{{- $_ := set $models $m.name (($m.engine | default dict).device | default "cpu") }}
{{- end }}
{{- $tenants := dict }}
{{- range $i, $t := .Values.tiered.tenants | default list }}
{{- if hasKey $tenants $t.name }}
{{- fail (printf "tiered.tenants[%d].name: duplicate tenant %q" $i $t.name) }}
{{- end }}
{{- $_ := set $tenants $t.name true }}
{{- range $j, $name := $t.models | default list }}
{{- if not (hasKey $models $name) }}
{{- fail (printf "tiered.tenants[%d].models[%d]: unknown model %q (models: %s)" $i $j $name (keys $models | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- with $t.dedicated }}
{{- if not (hasKey $models .model) }}
{{- fail (printf "tiered.tenants[%d].dedicated.model: unknown model %q (models: %s)" $i .model (keys $models | sortAlpha | join ", ")) }}
{{- end }}
{{- include "tiered.checkReplica" (dict "root" $ "replica" (.replica | default dict) "device" (get $models .model) "where" (printf "tiered.tenants[%d].dedicated.replica" $i)) }}
{{- end }}
{{- end }}
{{- range $i, $m := .Values.tiered.models }}
{{- include "tiered.checkReplica" (dict "root" $ "replica" ($m.shared_pool | default dict) "device" (get $models $m.name) "where" (printf "tiered.models[%d].shared_pool" $i)) }}
{{- end }}
{{- $groups := dict }}
{{- range $i, $g := .Values.workerGroups }}
{{- if hasKey $groups $g.name }}
{{- fail (printf "workerGroups[%d].name: duplicate worker group %q" $i $g.name) }}
{{- end }}
{{- $_ := set $groups $g.name true }}
{{- if gt (int ($g.minWorkers | default 0)) (int $g.maxWorkers) }}
{{- fail (printf "workerGroups[%d].minWorkers: %d exceeds maxWorkers=%d (group %s)" $i (int $g.minWorkers) (int $g.maxWorkers) $g.name) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* One replica against the worker groups: its node-type resource is advertised by some
     group, and on CUDA its ranks' GPUs fit (on one node for STRICT_PACK; on the groups'
     nodes together, maxWorkers each, otherwise). */}}
{{- define "tiered.checkReplica" -}}
{{- $r := .replica }}
{{- $res := $r.node_type_resource | default "" }}
{{- $candidates := list }}
{{- range .root.Values.workerGroups }}
{{- if or (not $res) (hasKey .resources $res) }}
{{- $candidates = append $candidates . }}
{{- end }}
{{- end }}
{{- if and $res (not $candidates) }}
{{- fail (printf "%s.node_type_resource: no worker group advertises %q in its resources" .where $res) }}
{{- end }}
{{- if eq .device "cuda" }}
{{- $tp := int ($r.tp_size | default 1) }}
{{- $perRank := float64 (($r.bundle_resources | default dict).GPU | default 1) }}
{{- $need := mulf $tp $perRank }}
{{- $node := 0.0 }}
{{- $all := 0.0 }}
{{- range $candidates }}
{{- $gpus := float64 (.resources.GPU | default 0) }}
{{- $node = maxf $node $gpus }}
{{- $all = addf $all (mulf $gpus (int .maxWorkers)) }}
{{- end }}
{{- $strict := eq ($r.placement_strategy | default "PACK") "STRICT_PACK" }}
{{- if or (gt $perRank $node) (gt $need (ternary $node $all $strict)) }}
{{- fail (printf "%s.tp_size: %d rank(s) need %g GPU%s, but the worker groups%s have %g (workerGroups[].resources.GPU, maxWorkers)" .where $tp $need (ternary " on one node" " in all" $strict) (ternary (printf " advertising %q" $res) "" (ne $res "")) (ternary $node $all $strict)) }}
{{- end }}
{{- end }}
{{- end -}}
